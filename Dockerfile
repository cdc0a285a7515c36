# bales-stream consumer image: slim Python, non-root user, health check without curl.
# The base is pinned to a release (bump it on purpose, e.g. with Renovate or Dependabot).
FROM python:3.11.11-slim-bookworm

# torch==2.13.0 from the default index is a CUDA build (GBs). Point this at a CPU wheel
# index for a small image, e.g. --build-arg PIP_EXTRA_INDEX_URL=<your CPU wheel index>.
# A build argument only: RUN steps see it, the image does not keep it.
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 bales
WORKDIR /app

# torch first, in a layer of its own: editing the code or the README does not fetch it again
RUN pip install torch==2.13.0 && rm -rf /root/.cache
COPY pyproject.toml README.md ./
COPY producers/ producers/
COPY bales_stream/ bales_stream/
COPY consumer.py ./
COPY weights/ weights/
RUN pip install . && rm -rf /root/.cache

# numeric, so that runAsNonRoot can verify it (the user "bales" has this uid)
USER 10001
# In the container the sidecar must be reachable by the orchestrator's probes and
# Prometheus: bind all interfaces. SIDECAR_TOKEN comes from the runtime environment
# (docker run -e SIDECAR_TOKEN, compose, a Kubernetes Secret), never from the image: without
# it, reload answers 403 and the start-up log says so; health, ready and metrics still work.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    WEIGHTS_DIR=/app/weights \
    LOG_FORMAT=json
EXPOSE 8000
# GET /ready with the standard library's http.client alone, exit 0 on 200 (a few tens of
# ms of CPU; `bales-stream check` says more but loads the settings stack on every probe)
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ['PORT']), timeout=2); c.request('GET', '/ready'); sys.exit(c.getresponse().status != 200)"]
STOPSIGNAL SIGTERM
CMD ["bales-stream", "serve"]
