# syntax=docker/dockerfile:1
# misskey-gateway container image.
#
#   docker build -t misskey-gateway .
#   docker run -p 8080:8080 -e MISSKEY_GATEWAY_UPSTREAM_URL=https://misskey.example misskey-gateway
#
# The build stage turns the project and its dependencies into wheels; the
# final stage installs those wheels with pip's --no-index, so it holds no
# compiler, no build backend and no source tree.

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/misskey_gateway-*.whl \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/misskey-gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/misskey-gateway /etc/misskey-gateway \
    && chown 10001:10001 /var/lib/misskey-gateway \
    && chmod 0700 /var/lib/misskey-gateway
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# Listen on every interface of the container. XDG_DATA_HOME puts the default
# SQLite store at sqlite:////var/lib/misskey-gateway/store.db; it is set this
# way rather than with MISSKEY_GATEWAY_STORE_URL so that setting
# MISSKEY_GATEWAY_REDIS_URL alone switches the store to Redis (store.url and
# redis.url must not disagree).
ENV MISSKEY_GATEWAY_SERVER_HOST=0.0.0.0 \
    MISSKEY_GATEWAY_SERVER_PORT=8080 \
    XDG_DATA_HOME=/var/lib \
    HOME=/var/lib/misskey-gateway
VOLUME ["/var/lib/misskey-gateway"]
USER 10001:10001
WORKDIR /var/lib/misskey-gateway
EXPOSE 8080

# The slim image has no curl, so Python's urllib probes the liveness endpoint;
# urlopen raises, and the check fails, on a refused connection or a non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('MISSKEY_GATEWAY_PORT') or os.environ.get('MISSKEY_GATEWAY_SERVER_PORT') or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/_gateway/healthz', timeout=4)"]

ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve"]
