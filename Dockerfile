# syntax=docker/dockerfile:1
# iso-proxy container image.
#
#   docker build -t iso-proxy .
#   docker run --rm -p 6000:6000 -p 127.0.0.1:9100:9100 \
#     -v "$PWD/deploy/compose/config.yaml:/etc/iso-proxy/config.yaml:ro" \
#     -e ISO_PROXY_DSN -e ISO_PROXY_PAN_KEY -e ISO_PROXY_ADMIN_TOKEN iso-proxy
#
# The config is mounted at /etc/iso-proxy/config.yaml; it must set `admin.host: 0.0.0.0`
# for Prometheus and Kubernetes probes to reach /metrics, /healthz and /readyz. Secrets
# come only from the environment (ISO_PROXY_DSN, ISO_PROXY_PAN_KEY, ISO_PROXY_ADMIN_TOKEN,
# ISO_PROXY_TLS_KEY_PASSWORD); the image holds none. It has no embedded PostgreSQL:
# without a DSN `iso-proxy run` exits 2 and says why.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the project and its dependencies as wheels (no compilers needed: every
# dependency ships manylinux wheels) -------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY codec/ codec/
COPY proxy/ proxy/
COPY fixtures/ fixtures/
COPY bench/ bench/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed, no source tree, no build tools ------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    ISO_PROXY_HEALTH_URL=http://127.0.0.1:9100/healthz
RUN groupadd --system --gid 10001 isoproxy \
    && useradd --system --uid 10001 --gid isoproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin isoproxy
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --root-user-action=ignore --no-index --find-links=/wheels \
        /wheels/iso_proxy-*.whl
WORKDIR /etc/iso-proxy
USER 10001:10001
# 6000: terminals (ISO 8583 over TCP); 9100: admin HTTP (/healthz /readyz /metrics /status)
EXPOSE 6000 9100
# The admin server answers /healthz while the process runs. Python, not curl: slim has
# no curl. ISO_PROXY_HEALTH_URL follows a non-default admin.port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ISO_PROXY_HEALTH_URL'], timeout=3)"]
# SIGTERM: stop accepting, let requests in flight finish (listen.shutdown_grace), sign
# off, exit 0. Give the container longer than shutdown_grace to stop (compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["iso-proxy", "run", "-c", "/etc/iso-proxy/config.yaml"]
