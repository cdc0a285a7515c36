"""The HTTP sidecar (aiohttp, in the service's own event loop): health, readiness, model
reload and Prometheus metrics. There is deliberately no inference endpoint. It sees a
consumer only through ``Consumer``, the narrow interface below (``worker.Worker`` is one).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler
from redis.exceptions import RedisError

from .errors import ModelLoadError
from .metrics import Metrics
from .model_config import check_sha256
from .settings import Settings
from .status import WorkerStatus

log = logging.getLogger(__name__)


class Consumer(Protocol):
    """What the sidecar may ask of a consumer: its settings, readiness and metrics, the
    /health document, a fleet-wide reload, and fresh gauges before a scrape."""

    @property
    def settings(self) -> Settings: ...

    @property
    def status(self) -> WorkerStatus: ...

    @property
    def metrics(self) -> Metrics: ...

    async def health(self) -> dict[str, Any]: ...

    async def reload(
        self, model_id: str, weights_path: str, sha256: str | None = None
    ) -> dict[str, object]: ...

    async def refresh_metrics(self) -> None: ...


WORKER_KEY: web.AppKey[Consumer] = web.AppKey("worker")
METRICS_HANDLER_KEY: web.AppKey[Handler] = web.AppKey("metrics_handler")


def create_app(worker: Consumer) -> web.Application:
    """The sidecar application for one worker."""
    app = web.Application(client_max_size=64 * 1024)
    app[WORKER_KEY] = worker
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/models/{model_id}/reload", reload_model)
    app[METRICS_HANDLER_KEY] = make_aiohttp_handler(worker.metrics.registry)
    app.router.add_get("/metrics", metrics)
    return app


async def health(request: web.Request) -> web.Response:
    """Models with versions, queue depths, tasks, consumer identity and Redis reachability."""
    return web.json_response(await request.app[WORKER_KEY].health())


async def ready(request: web.Request) -> web.Response:
    """200 when ready to take traffic; 503 with the reasons otherwise."""
    status = request.app[WORKER_KEY].status
    if status.ready:
        return web.json_response({"ready": True})
    return web.json_response({"ready": False, "reasons": status.reasons()}, status=503)


def _authorized(request: web.Request, worker: Consumer) -> bool:
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
        outcome = await worker.reload(model_id, weights_path, sha256)
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


async def metrics(request: web.Request) -> web.StreamResponse:
    """Prometheus exposition (404 when ENABLE_PROMETHEUS is false), by prometheus_client's
    own handler: the text format, or OpenMetrics when the scraper asks for it (Accept), gzip
    when it accepts it."""
    worker = request.app[WORKER_KEY]
    if not worker.settings.enable_prometheus:
        return _problem(404, "metrics are disabled (ENABLE_PROMETHEUS=false)")
    await worker.refresh_metrics()
    return await request.app[METRICS_HANDLER_KEY](request)


def _reload_refused_message(host: str) -> str:
    return (
        f"reload is disabled: the sidecar listens on HOST={host}, beyond this machine, and "
        "SIDECAR_TOKEN is not set; set SIDECAR_TOKEN and send Authorization: Bearer <token>"
    )


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Sidecar:
    """Runs the sidecar app on HOST:PORT inside the current event loop."""

    def __init__(self, worker: Consumer, host: str, port: int) -> None:
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
