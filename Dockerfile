# FacePay server image. Model weights are not baked in: mount them at /models (read-only)
# or run `facepay models fetch --dest /models` into a volume. Redis is external
# (FACEPAY_REDIS_URL); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FACEPAY_MODELS_DIR=/models \
    FACEPAY_DATA_DIR=/var/lib/facepay

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY session ./session
COPY stream_server ./stream_server
COPY models ./models
COPY web_client ./web_client
# Editable: the model manifest and the terminal pages are read from the source tree.
# Every dependency ships binary wheels for linux/amd64 and arm64: no compiler needed.
RUN pip install --only-binary=:all: -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/facepay --create-home facepay

USER facepay
EXPOSE 8080
# The server listens only once its gallery is loaded: about a minute at a million
# subjects (docs/scaling.md). Failures within the start period do not count, so a big
# replica is not marked unhealthy (which would stop `docker compose up` at the balancer).
HEALTHCHECK --interval=10s --timeout=4s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=3)"]
CMD ["facepay", "serve", "--host", "0.0.0.0", "--port", "8080"]
