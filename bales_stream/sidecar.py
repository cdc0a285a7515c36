"""The HTTP sidecar (aiohttp, in the service's own event loop): health, readiness, model
reload and Prometheus metrics. There is deliberately no inference endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from .errors import ModelLoadError
from .model_config import check_sha256
from .shards import UNSHARDED
from .worker import Worker

log = logging.getLogger(__name__)

REDIS_PROBE_TIMEOUT_S = 1.0
WORKER_KEY: web.AppKey[Worker] = web.AppKey("worker", Worker)


def create_app(worker: Worker) -> web.Application:
    """The sidecar application for one worker."""
    app = web.Application(client_max_size=64 * 1024)
    app[WORKER_KEY] = worker
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/models/{model_id}/reload", reload_model)
    app.router.add_get("/metrics", metrics)
    return app


async def _queue_stats(worker: Worker) -> list[dict[str, Any]] | None:
    try:
        async with asyncio.timeout(REDIS_PROBE_TIMEOUT_S):
            stats = await worker.streams.queue_stats()
    except (RedisError, TimeoutError) as exc:
        worker.status.last_error = f"{type(exc).__name__}: {exc}"
        return None
    worker.metrics.observe_queues(stats)
    return [
        {
            "shard": None if s.shard == UNSHARDED else s.shard,
            "priority": s.priority,
            "stream": worker.streams.stream(s.shard, s.priority),
            "length": s.length,
            "lag": s.lag,
            "pending": s.pending,
            "oldest_age_s": None if s.oldest_age_s is None else round(s.oldest_age_s, 3),
            "consumers": s.consumers,
        }
        for s in stats
    ]


async def health(request: web.Request) -> web.Response:
    """Models with versions, queue depths, consumer identity and Redis reachability."""
    worker = request.app[WORKER_KEY]
    queues = await _queue_stats(worker)
    settings = worker.settings
    body = {
        "status": "ok" if worker.status.ready and queues is not None else "degraded",
        "ready": worker.status.ready,
        "consumer": settings.consumer_name,
        "group": settings.consumer_group,
        "redis": {
            "url": settings.redis_url_masked,
            "reachable": queues is not None,
            "last_error": worker.status.last_error,
        },
        "models": {
            model_id: {
                "version": model.version,
                "model_type": model.spec.model_type,
                "input_shape": list(model.spec.input_shape),
            }
            for model_id, model in worker.registry.models().items()
        },
        "queues": queues,
        "batcher": {"waiting": len(worker.batcher)},
        "tasks": worker.supervisor.report(),
        "problems": worker.status.problems,
    }
    return web.json_response(body)


async def ready(request: web.Request) -> web.Response:
    """200 once models are loaded and the group is joined; 503 (with why) otherwise."""
    status = request.app[WORKER_KEY].status
    if status.ready:
        return web.json_response({"ready": True})
    reasons = [
        reason
        for reason, failing in (
            ("models not loaded", not status.models_loaded),
            ("consumer group not joined", not status.group_joined),
            (f"Redis unreachable: {status.last_error}", not status.redis_ok),
            ("shutting down", status.stopping),
        )
        if failing
    ] + status.problems
    return web.json_response({"ready": False, "reasons": reasons}, status=503)


def _authorized(request: web.Request, worker: Worker) -> bool:
    """True when the request carries the bearer token, or no token is set (the sidecar then
    listens on loopback only: ``reload_model`` refuses first otherwise)."""
    token = worker.settings.sidecar_token
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    return hmac.compare_digest(given.encode(), expected.encode())


async def reload_model(request: web.Request) -> web.Response:
    """Swap a model's weights atomically on every consumer: ``{"weights_path": "stub_v2.pt"}``,
    optionally with ``"sha256"``, the file's hash (required for a pinned model's other file)."""
    worker = request.app[WORKER_KEY]
    if worker.settings.reload_refused:
        return _problem(403, _reload_refused_message(worker.settings.host))
    if not _authorized(request, worker):
        return _problem(
            401, "missing or wrong bearer token (Authorization: Bearer <SIDECAR_TOKEN>)"
        )
    try:
        weights_path, sha256 = _reload_body(await request.text())
    except ValueError as exc:
        return _problem(400, str(exc))
    model_id = request.match_info["model_id"]
    try:
        outcome = await worker.control.reload(model_id, weights_path, sha256)
    except ModelLoadError as exc:
        log.warning("reload of %s refused: %s", model_id, exc.message)
        return _problem(exc.http_status, exc.message)
    except RedisError as exc:
        return _problem(503, f"reloaded here, but could not tell the other consumers: {exc}")
    return web.json_response(outcome)


def _reload_body(text: str) -> tuple[str, str | None]:
    """``weights_path`` and the optional ``sha256`` of a reload body; ValueError says why not."""
    expected = 'body must be {"weights_path": "<file in WEIGHTS_DIR>", "sha256": "<optional>"}'
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # also huge integers, nesting beyond the limit
        raise ValueError(f"{expected}, as JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("weights_path"), str):
        raise ValueError(expected)
    sha256 = body.get("sha256")
    if sha256 is not None:
        check_sha256(sha256 if isinstance(sha256, str) else f"<a JSON {type(sha256).__name__}>")
    return body["weights_path"], sha256


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (404 when ENABLE_PROMETHEUS is false)."""
    worker = request.app[WORKER_KEY]
    if not worker.settings.enable_prometheus:
        return _problem(404, "metrics are disabled (ENABLE_PROMETHEUS=false)")
    await _queue_stats(worker)
    served = worker.registry.models()
    worker.metrics.observe_models({model_id: m.version for model_id, m in served.items()})
    return web.Response(
        body=worker.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _reload_refused_message(host: str) -> str:
    return (
        f"reload is disabled: the sidecar listens on HOST={host}, beyond this machine, and "
        "SIDECAR_TOKEN is not set; set SIDECAR_TOKEN and send Authorization: Bearer <token>"
    )


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Sidecar:
    """Runs the sidecar app on HOST:PORT inside the current event loop."""

    def __init__(self, worker: Worker, host: str, port: int) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; ``port`` 0 picks a free port (read ``self.port`` after)."""
        self._runner = web.AppRunner(create_app(self.worker), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("sidecar listening on http://%s:%d", self.host, self.port)
        if self.worker.settings.reload_refused:
            log.warning(
                "%s (/health, /ready and /metrics are served)",
                _reload_refused_message(self.worker.settings.host),
            )

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
