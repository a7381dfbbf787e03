# comet1m: one image for the Comet service (default CMD) and the admin sidecar (CMD comet-admin).
#
#   DOCKER_BUILDKIT=1 docker build -t comet1m:latest .
#   DOCKER_BUILDKIT=1 docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt \
#       -t comet1m:latest .            # where PyPI is reached through a TLS-intercepting proxy
#
# Runs with a read-only root filesystem: the only writable paths are /run/comet (control socket,
# shared with the sidecar through a volume), /var/log/comet (CSV logs), /var/lib/comet (the durable
# message history: a named volume, so ids and history survive a new container) and /tmp, all
# mounted by the caller: named volumes (they take the image's ownership) or tmpfs owned by the
# comet user:
#   docker run --read-only --network host --ulimit nofile=20000:20000 \
#       --tmpfs /run/comet:uid=10001,gid=10001,mode=0770 --tmpfs /var/log/comet:uid=10001,gid=10001 \
#       -v comet-state:/var/lib/comet --tmpfs /tmp comet1m:latest

# ---- base: Debian's python3, shared by both stages so the interpreter paths match --------------
FROM debian:bookworm-slim AS base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtualenv with the dependencies, then the project itself ----------------------
# A build stage never runs as a container, so it has no HEALTHCHECK.
# hadolint ignore=DL3057
FROM base AS builder
# Pinning Debian package versions breaks the build on every point release; the suite pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/comet
# Dependencies first, from pyproject.toml alone, so a source change does not reinstall them.
# PIP_CERT points pip at the proxy's CA when the optional BuildKit secret `pip_cert` is given.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/comet/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY README.md ./
COPY service ./service
COPY admin_api ./admin_api
COPY loadgen ./loadgen
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/comet/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
    && /opt/comet/bin/python -m compileall -q /opt/comet/lib

# ---- runtime: python3 + the virtualenv, nothing else --------------------------------------------
FROM base AS runtime
ARG COMET_UID=10001
RUN groupadd --system --gid "${COMET_UID}" comet \
    && useradd --system --uid "${COMET_UID}" --gid comet --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin comet \
    && mkdir -p /run/comet /var/log/comet /var/lib/comet \
    && chown comet:comet /run/comet /var/log/comet /var/lib/comet \
    && chmod 0770 /run/comet
COPY --from=builder /opt/comet /opt/comet
ENV PATH=/opt/comet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    COMET_CONTROL_SOCKET=/run/comet/control.sock \
    COMET_ADMIN_CONTROL_SOCKET=/run/comet/control.sock \
    COMET_LOG_DIR=/var/log/comet \
    COMET_STATE_DIR=/var/lib/comet \
    COMET_SCREEN=off
USER 10001:10001
WORKDIR /var/log/comet
EXPOSE 8888 8080
# The service is healthy when a subscriber gets its `Welcome!` line. The admin container
# overrides this with a GET /healthz check (see ansible/roles/comet).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-m", "service.probe"]
STOPSIGNAL SIGTERM
CMD ["comet-service"]
