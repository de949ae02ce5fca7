"""PyInstaller runtime hook of the one-file build: give child processes the host's environment back.

The bootloader points LD_LIBRARY_PATH at the unpacked bundle (keeping the user's value in
LD_LIBRARY_PATH_ORIG) so the bundled Python finds its libraries. The loader read it when this process
started, so restoring it here changes nothing for the runner, but it keeps uv, the host interpreter and every
experiment off the bundle's libssl/libz/libffi (a host python3 loading them can fail in odd ways).
PYINSTALLER_RESET_ENVIRONMENT makes a frozen child (``studio-runner`` started again by a script) unpack
itself afresh instead of taking this process's bundle as its own.
"""

import os

_original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
if _original:
    os.environ["LD_LIBRARY_PATH"] = _original
else:
    os.environ.pop("LD_LIBRARY_PATH", None)
os.environ["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
