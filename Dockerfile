# studio-runner container image: multi-stage, non-root.
#
#   docker build -t studio-runner .                      # CPU image on python:3.11-slim (Debian 12)
#   docker build -t studio-runner:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .   # CUDA variant (Python 3.12 from Ubuntu)
#   docker run --rm studio-runner --version
#
# One Dockerfile serves both: BASE_IMAGE is used by both stages (the venv built in the first stage points at the
# base image's interpreter, so the two stages must share it), and a base without Python (the nvidia/cuda images)
# gets the distribution's python3 + python3-venv (it must have tarfile's extraction filters: 3.10.12+, 3.11.4+
# or 3.12+; Ubuntu 22.04 and 24.04 do, Debian 12's 3.11.2 does not). See deploy/README.md ("Docker image").

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: install the package and its dependencies (uv included) into a self-contained venv -----------
FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN set -e; \
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    if ! python3 -c 'import tarfile; tarfile.data_filter'; then \
        echo "BASE_IMAGE's python3 lacks tarfile extraction filters: needs 3.10.12+, 3.11.4+ or 3.12+" >&2; \
        exit 1; \
    fi; \
    python3 -m venv /opt/studio-runner
COPY pyproject.toml README.md /src/
COPY studio_runner /src/studio_runner
COPY tui /src/tui
# the tui extra (Textual) lets `docker exec -it` / `kubectl exec -it` run `studio-runner tui` in the container
RUN /opt/studio-runner/bin/pip install "/src[tui]" \
    && /opt/studio-runner/bin/studio-runner --version

# ---- runtime: the venv, an unprivileged user, the cache volumes ---------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 studio \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/studio --create-home \
        --shell /usr/sbin/nologin studio \
    && mkdir -p /var/cache/studio-runner/envs /var/cache/studio-runner/uv /var/cache/studio-runner/artifacts \
        /var/lib/studio-runner/work /srv/studio-runner/certs /etc/studio-runner/state \
    && chown -R 10001:10001 /var/cache/studio-runner /var/lib/studio-runner /srv/studio-runner /home/studio
COPY --from=builder /opt/studio-runner /opt/studio-runner
COPY deploy/docker/healthcheck.py /usr/local/lib/studio-runner/healthcheck.py

LABEL org.opencontainers.image.title="studio-runner" \
      org.opencontainers.image.description="StudioML experiment runner" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Options are STUDIO_RUNNER_<NAME> variables (studio_runner/config.py); these are the image's defaults and
# every one can be overridden with `docker run -e` or a Kubernetes ConfigMap. The caches live under one
# volume so uv can hardlink packages into environments instead of copying them.
ENV PATH=/opt/studio-runner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/studio \
    STUDIO_RUNNER_WORKING_DIR=/var/lib/studio-runner/work \
    STUDIO_RUNNER_ENV_CACHE_DIR=/var/cache/studio-runner/envs \
    STUDIO_RUNNER_UV_CACHE_DIR=/var/cache/studio-runner/uv \
    STUDIO_RUNNER_CACHE_DIR=/var/cache/studio-runner/artifacts \
    STUDIO_RUNNER_PROM_ADDRESS=0.0.0.0:9090

# relative key directories (./certs/...) resolve here; the Kubernetes manifests mount the key Secrets below it
WORKDIR /srv/studio-runner
USER 10001:10001
VOLUME ["/var/cache/studio-runner", "/var/lib/studio-runner"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "/usr/local/lib/studio-runner/healthcheck.py"]
ENTRYPOINT ["studio-runner"]
CMD ["run"]
