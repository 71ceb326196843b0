# FirstCare Realtime bridge: MQTT ingest -> store -> alerts -> WebSocket/SSE/REST.
# Configure with FC_ environment variables (see README); compose: docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs (keeps .venv, tests and data out of the image).
COPY pyproject.toml README.md ./
COPY firstcare ./firstcare
COPY bridge ./bridge
COPY edge ./edge
COPY simulators ./simulators
RUN pip install . && rm -rf /app/build

# Unprivileged user; /data holds the SQLite store (mount a volume there).
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin firstcare \
    && mkdir -p /data && chown firstcare:firstcare /data
VOLUME ["/data"]
USER firstcare
WORKDIR /data

# Listen on all interfaces inside the container (the app's default is loopback).
ENV FC_HTTP_HOST=0.0.0.0 \
    FC_HTTP_PORT=8000 \
    FC_STORE_URL=sqlite:////data/firstcare.db
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FC_HTTP_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["firstcare"]
CMD ["bridge"]
