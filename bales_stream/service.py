"""The service's lifecycle: Redis connection (or an embedded one), worker, sidecar, signals.

``run_service`` reads like the life of the process: connect, start the sidecar (so /ready
says 503 while models load), start the worker, wait for SIGTERM/SIGINT, drain, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from bales_producer.connection import pack_with_hiredis
from bales_producer.wire import is_cluster_url, plain_url
from redis.asyncio.cluster import RedisCluster

from .admission import Admission
from .batcher import Batcher
from .clock import RedisClock
from .completion import Completer
from .control import FleetControl
from .dead_letters import DeadLetters
from .embedded_redis import RedisServer, is_listening
from .errors import StartupError
from .inference import InferenceExecutor
from .leases import Leases
from .metrics import Metrics
from .processing import BatchProcessor
from .protocol import Request
from .recovery import Recovery
from .registry import ModelRegistry
from .settings import DEFAULT_REDIS_URL, Settings
from .shards import ShardedStreams
from .sidecar import Sidecar
from .status import RedisTrouble, WorkerStatus
from .supervisor import Supervisor
from .worker import Parts, Worker

log = logging.getLogger(__name__)

DEMO_REQUESTS = 3
DEFAULT_PROBE = ("localhost", 6379)


async def resolve_redis_url(
    settings: Settings, probe: tuple[str, int] = DEFAULT_PROBE
) -> tuple[str, RedisServer | None]:
    """REDIS_URL, or an embedded redis-server when it is unset and ``probe`` is silent."""
    url = settings.redis_url.get_secret_value()
    if settings.redis_url_is_explicit or url != DEFAULT_REDIS_URL:
        return url, None
    if await asyncio.to_thread(is_listening, *probe):
        return url, None
    server = await asyncio.to_thread(RedisServer().start)
    log.warning(
        "REDIS_URL is not set and nothing answers on %s:%d: started %s on %s "
        "(an embedded Redis for trying things out; nothing is persisted)",
        *probe,
        server.binary,
        server.url,
    )
    return server.url, server


def connect(url: str, *, cluster: bool = False) -> Any:
    """The service's Redis client: one node, or (``cluster``) a Redis Cluster reached
    through the node ``url`` names. No socket timeout (see ``streams.bounded``); TCP
    keepalive notices a peer that vanished. On one node, commands are packed by hiredis
    (``bales_producer.connection``)."""
    options: dict[str, Any] = {"socket_timeout": None, "socket_keepalive": True}
    if cluster or is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), **options)
    return pack_with_hiredis(aioredis.Redis.from_url(url, **options))


class EventLoopUnavailable(StartupError):
    """``EVENT_LOOP=uvloop`` where uvloop is not installed."""


class SidecarPortTaken(StartupError):
    """``HOST``:``PORT`` is already bound (by another consumer, say)."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``EVENT_LOOP`` asks for: uvloop's (``auto``: when it is installed), or
    None for asyncio's own; ``EventLoopUnavailable`` for ``uvloop`` without uvloop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopUnavailable(
                "EVENT_LOOP=uvloop, but uvloop is not installed (pip install uvloop, or "
                "EVENT_LOOP=auto)"
            ) from None
        return None
    return uvloop.new_event_loop


def serve(settings: Settings, *, demo: bool = False) -> int:
    """Run the service on the event loop the settings choose; its exit status."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(run_service(settings, demo=demo))


EXIT_TASK_FAILED = 3
"""Exit status when a long-lived task could not stay up (see ``supervisor``)."""


def build_worker(settings: Settings, redis: Any, metrics: Metrics) -> Worker:
    """The composition root: every collaborator of one consumer, built once from the
    settings (the topology, single node or cluster, chosen here), wired, and handed to the
    ``Worker`` that runs the loops."""
    supervisor = Supervisor(metrics)
    status = WorkerStatus(supervisor=supervisor)
    clock = RedisClock()
    executor = InferenceExecutor(settings.thread_pool_size, settings.intra_op_threads)
    registry = ModelRegistry(settings.weights_dir, executor.run)
    streams = ShardedStreams(
        redis,
        settings.keys,
        settings.served_shards,
        settings.consumer_group,
        settings.consumer_name,
        settings.reply_ttl_s,
        cluster=settings.cluster_mode,
        max_input_bytes=settings.max_input_bytes,
    )
    batcher: Batcher[Request] = Batcher(
        settings.max_batch_size,
        settings.batch_window_ms,
        settings.priority_aging_ms,
        adaptive=settings.adaptive_window,
    )
    stopping = asyncio.Event()
    trouble = RedisTrouble(status, metrics, streams, stopping)
    completer = Completer(streams, settings, metrics, trouble, registry)
    dead_letters = DeadLetters(streams, settings, metrics, status, registry)
    leases = Leases(streams)
    admission = Admission(
        settings, registry, batcher, clock, metrics, completer, dead_letters, leases
    )
    return Worker(
        settings,
        metrics,
        Parts(
            supervisor=supervisor,
            status=status,
            clock=clock,
            executor=executor,
            registry=registry,
            streams=streams,
            batcher=batcher,
            processor=BatchProcessor(registry, executor, metrics, clock.now_ms),
            trouble=trouble,
            completer=completer,
            leases=leases,
            admission=admission,
            recovery=Recovery(streams, settings, metrics, admission, leases, dead_letters, trouble),
            control=FleetControl(redis, settings, registry, metrics, status),
            stopping=stopping,
        ),
    )


async def run_service(settings: Settings, *, demo: bool = False) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP, then stop gracefully (exit status 0); or until a
    long-lived task cannot stay up, then drain and return ``EXIT_TASK_FAILED`` so that the
    orchestrator restarts the process."""
    url, embedded = await resolve_redis_url(settings)
    redis = connect(url, cluster=settings.cluster_mode)
    worker = build_worker(settings, redis, Metrics())
    sidecar = Sidecar(worker, settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # HUP: a closed terminal
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "bales-stream starting: redis=%s group=%s consumer=%s",
        settings.redis_url_masked if embedded is None else url,
        settings.consumer_group,
        settings.consumer_name,
    )
    status = 0
    try:
        await _start_sidecar(sidecar)
        if await _start_unless_stopped(worker, stop):
            demo_task = asyncio.create_task(run_demo(url, settings)) if demo else None
            await _first(stop.wait(), worker.failed.wait())
            if demo_task is not None:
                demo_task.cancel()
            if worker.failed.is_set():
                log.critical("a task could not stay up (see above): draining, then exiting")
                status = EXIT_TASK_FAILED
            else:
                log.info("stop requested: draining")
            await worker.stop()
    finally:
        await sidecar.stop()
        await redis.aclose()
        if embedded is not None:
            embedded.stop()
    log.info("bales-stream stopped")
    return status


async def _start_sidecar(sidecar: Sidecar) -> None:
    """Bind the sidecar; a taken port is a ``SidecarPortTaken`` that says what to change."""
    try:
        await sidecar.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise SidecarPortTaken(
            f"port {sidecar.port} on {sidecar.host} is taken (another bales-stream on this "
            "host?): set PORT to a free port, or PORT=0 for any free one"
        ) from None


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


async def _start_unless_stopped(worker: Worker, stop: asyncio.Event) -> bool:
    """Start the worker; give up cleanly if a stop signal comes first (e.g. no Redis)."""
    starting = asyncio.create_task(worker.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        starting.result()
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    worker.executor.stop()
    return False


async def run_demo(url: str, settings: Settings) -> None:
    """Send a few requests through the producer library and log the replies."""
    from bales_producer import AsyncClient, BalesError

    keys = settings.keys
    async with AsyncClient(
        url,
        prefix=keys.prefix,
        queue=keys.queue,
        priority_levels=keys.priority_levels,
        cluster=settings.cluster_mode,
        shards=keys.shards,
    ) as client:
        for priority in range(min(DEMO_REQUESTS, keys.priority_levels)):
            values = [random.uniform(-1, 1) for _ in range(128)]
            try:
                reply = await client.infer(settings.default_model_id, values, priority=priority)
            except BalesError as exc:
                log.error("demo request failed: %s", exc)
                continue
            log.info("demo reply (p%d): %s", priority, reply)
    log.info("demo done; send your own with: bales-stream send --random 128")
