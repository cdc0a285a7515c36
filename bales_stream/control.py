"""Fleet-wide model reload through Redis.

A reload asked of any consumer's sidecar is first done there (load, check, warm up, swap);
only if that works is it recorded in the ``models`` hash (what every consumer should
serve) and announced on the ``control`` pub/sub channel. Every consumer listens and swaps
the same file in between its batches. The hash makes it durable: a consumer that starts
later, or missed a message while disconnected, syncs from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import ModelLoadError
from .metrics import Metrics
from .registry import ModelRegistry
from .settings import Settings

log = logging.getLogger(__name__)

RESUBSCRIBE_BACKOFF_S = 1.0


class FleetControl:
    """Reloads that reach every consumer of the group."""

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, registry: ModelRegistry, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.keys = settings.keys
        self.cluster = settings.cluster_mode
        self.registry = registry
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow announcements (the listener syncs from the hash once subscribed)."""
        self._task = asyncio.create_task(self._listen(), name="bales-control")

    async def stop(self) -> None:
        """Stop following announcements."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self, model_id: str, weights_path: str) -> dict[str, object]:
        """Reload here; if it works, make every consumer follow. Raises ``ModelLoadError``."""
        old, new = await self._reload(model_id, weights_path)
        record = json.dumps({"weights_path": weights_path, "version": new})
        message = json.dumps({"model_id": model_id})
        if self.cluster:  # no MULTI across a cluster: the hash first, so a late joiner syncs
            await self.redis.hset(self.keys.desired_models, model_id, record)
            listeners = await self.redis.publish(self.keys.control_channel, message)
        else:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.desired_models, model_id, record)
                pipe.publish(self.keys.control_channel, message)
                _, listeners = await pipe.execute()
        return {
            "model_id": model_id,
            "previous_version": old,
            "version": new,
            "consumers_notified": int(listeners),
        }

    async def _reload(self, model_id: str, weights_path: str) -> tuple[str, str]:
        """Reload through the registry, counting the outcome (an unserved model id is
        counted as ``unknown``: request-supplied text never becomes a label value)."""
        label = model_id if self.registry.get(model_id) is not None else "unknown"
        try:
            versions = await self.registry.reload(model_id, weights_path)
        except ModelLoadError:
            self.metrics.reloads.labels(label, "failed").inc()
            raise
        self.metrics.reloads.labels(label, "ok").inc()
        return versions

    async def sync(self) -> None:
        """Serve, for every model in the hash, the version the fleet serves."""
        desired = await self.redis.hgetall(self.keys.desired_models)
        for raw_id, raw_record in desired.items():
            model_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            await self._follow(model_id, json.loads(raw_record))

    async def _follow(self, model_id: str, record: dict[str, str]) -> None:
        current = self.registry.get(model_id)
        if current is None or current.version == record.get("version"):
            return
        try:
            old, new = await self._reload(model_id, record["weights_path"])
        except ModelLoadError as exc:
            log.error(
                "cannot follow the fleet's reload of %s to %s: %s; still serving %s",
                model_id,
                record.get("version"),
                exc.message,
                current.version,
            )
            return
        log.info("followed the fleet: %s %s -> %s", model_id, old, new)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.control_channel)
                    await self.sync()  # anything announced while we were not listening
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._on_message(message["data"])
            except RedisError as exc:
                log.warning("control channel lost (%s); resubscribing", exc)
                await asyncio.sleep(RESUBSCRIBE_BACKOFF_S)

    async def _on_message(self, data: bytes) -> None:
        try:
            model_id = json.loads(data)["model_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed control message: %r", data[:200])
            return
        raw = await self.redis.hget(self.keys.desired_models, model_id)
        if raw is not None:
            await self._follow(model_id, json.loads(raw))
