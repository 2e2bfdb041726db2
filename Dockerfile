# syntax=docker/dockerfile:1
# The estate gateway's image: `docker build -t estate-gateway .` (BuildKit, the default
# of current Docker). Configured by environment only, see README "Configuration".

# -- builder: wheels of the project and of every dependency ----------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A compiler for a dependency without a binary wheel on this architecture; it stays here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY estate ./estate
COPY actors ./actors
COPY alembic ./alembic
RUN pip wheel --wheel-dir /wheels .

# -- final: only the wheels, installed; no compiler, no sources ------------------------
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels estate-gateway

RUN groupadd --system --gid 10001 estate \
    && useradd --system --uid 10001 --gid estate --home-dir /var/lib/estate \
       --shell /usr/sbin/nologin estate \
    && mkdir -p /var/lib/estate \
    && chown estate:estate /var/lib/estate

COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# The SQLite default (DATABASE_URL unset) lives in the data volume; with PostgreSQL
# the volume only holds the working directory.
WORKDIR /var/lib/estate
VOLUME ["/var/lib/estate"]

# /healthz and /metrics on every interface of the container, so that other containers
# (Prometheus) and a published port reach them; the HEALTHCHECK below runs inside the
# container and asks 127.0.0.1 on HEALTH_ADDRESS's port. HEALTH_ADDRESS=off: no check.
ENV DATABASE_URL=sqlite:////var/lib/estate/estate.db \
    HEALTH_ADDRESS=0.0.0.0:9480
EXPOSE 9480

USER estate:estate

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; address = os.environ.get('HEALTH_ADDRESS', '127.0.0.1:9480'); address.lower() == 'off' and sys.exit(0); urllib.request.urlopen('http://127.0.0.1:%s/healthz' % address.rpartition(':')[2], timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD []
