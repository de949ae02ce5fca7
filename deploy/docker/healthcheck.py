"""Container HEALTHCHECK: exit 0 when the runner's ``/healthz`` answers 200, else 1.

Why a script and not curl: the slim and CUDA base images have no curl or wget, and the runner's own
interpreter is there anyway. The port comes from the same variable the runner reads
(``STUDIO_RUNNER_PROM_ADDRESS``, else the Go name ``PROM_ADDRESS``), so moving the status address moves the
check with it; a wildcard host (``0.0.0.0``, ``::``, empty) is reached through loopback. Stdlib only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_ADDRESS = "127.0.0.1:9090"


def healthz_url(environ: Mapping[str, str]) -> str | None:
    """The URL to probe, or None when the status server is disabled (empty address)."""
    address = environ.get("STUDIO_RUNNER_PROM_ADDRESS", environ.get("PROM_ADDRESS", DEFAULT_ADDRESS)).strip()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = healthz_url(os.environ)
    if url is None:
        print("healthcheck: STUDIO_RUNNER_PROM_ADDRESS is empty: the runner serves no /healthz",
              file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))) as reply:
            return 0 if reply.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
