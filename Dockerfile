# gateway: an OpenAI-compatible gateway in front of DeepInfra.
# Config comes from a mounted file (GATEWAY_CONFIG), secrets from env vars (DEEPINFRA_TOKEN, GATEWAY_ADMIN_KEY).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/config.yaml

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The same install step as the README's: pip install .
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 gateway

USER 10001
WORKDIR /home/gateway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
