"""Fleet-wide model reload through Redis.

A reload asked of any consumer's sidecar is first done there (load, check, warm up, swap);
only if that works is it recorded in the ``models`` hash (what every consumer should
serve) and announced on the ``control`` pub/sub channel. Every consumer listens and swaps
the same file in between its batches. The hash makes it durable: a consumer that starts
later, or missed a message while disconnected, syncs from it.

Both are read from Redis, so both are validated (``DesiredModel``, ``ControlMessage``): a
record or message that is not what a reload writes is logged and skipped, never fatal, at
start-up or later. Who may write them is a matter of Redis ACLs (docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from .backoff import Backoff
from .errors import ModelLoadError
from .metrics import RELOAD_FAILED, RELOAD_OK, Metrics
from .model_config import MODEL_ID_PATTERN
from .registry import ModelRegistry
from .settings import Settings
from .status import WorkerStatus

log = logging.getLogger(__name__)

RESUBSCRIBE_BACKOFF_MAX_S = 30.0
"""The longest wait between two tries to resubscribe (the waits double up to it); the hash
is synced on each resubscription, so nothing announced meanwhile is missed."""
MAX_RECORD_BYTES = 4096


class DesiredModel(BaseModel):
    """A record of the models hash: the weights every consumer should serve for a model."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    weights_path: str = Field(min_length=1, max_length=1024)
    version: str = Field(min_length=1, max_length=200)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """The file's hash when the reload named one (a pinned model's new file)."""


class ControlMessage(BaseModel):
    """A message on the control channel: "follow the models hash for this model"."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_id: str = Field(pattern=MODEL_ID_PATTERN)


def parse_record(model_id: bytes | str, raw: bytes | str) -> tuple[str, DesiredModel] | None:
    """A models-hash field and value as (model_id, record), or None (logged) if either is
    not what a reload writes."""
    try:
        name = ControlMessage(model_id=_text(model_id)).model_id
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"the record has {len(raw)} bytes; at most {MAX_RECORD_BYTES}")
        return name, DesiredModel.model_validate_json(raw)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        log.warning(
            "ignoring a malformed record in the models hash (%r): %s",
            _text(model_id)[:100],
            str(exc).splitlines()[0][:300],
        )
        return None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class FleetControl:
    """Reloads that reach every consumer of the group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        registry: ModelRegistry,
        metrics: Metrics,
        status: WorkerStatus,
    ) -> None:
        self.redis = redis
        self.status = status
        self.keys = settings.keys
        self.cluster = settings.cluster_mode
        self.registry = registry
        self.metrics = metrics

    async def reload(
        self, model_id: str, weights_path: str, sha256: str | None = None
    ) -> dict[str, object]:
        """Reload here; if it works, make every consumer follow (with ``sha256``, the hash
        the file must have, instead of the model's pin). Raises ``ModelLoadError``."""
        old, new = await self._reload(model_id, weights_path, sha256)
        desired = DesiredModel(weights_path=weights_path, version=new, sha256=sha256)
        record = desired.model_dump_json(exclude_none=True)
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

    async def _reload(
        self, model_id: str, weights_path: str, sha256: str | None = None
    ) -> tuple[str, str]:
        """Reload through the registry, counting the outcome (under ``metric_label``)."""
        label = self.registry.metric_label(model_id)
        try:
            versions = await self.registry.reload(model_id, weights_path, sha256)
        except Exception:
            self.metrics.reloads.labels(label, RELOAD_FAILED).inc()
            raise
        self.metrics.reloads.labels(label, RELOAD_OK).inc()
        return versions

    async def sync(self) -> None:
        """Serve, for every model in the hash, the version the fleet serves (malformed
        records are skipped)."""
        desired = await self.redis.hgetall(self.keys.desired_models)
        for raw_id, raw_record in desired.items():
            parsed = parse_record(raw_id, raw_record)
            if parsed is not None:
                await self._follow(*parsed)

    async def _follow(self, model_id: str, record: DesiredModel) -> None:
        """Serve the record's version of ``model_id``; one that cannot be loaded stands as a
        problem (in /ready and /health) until a record this consumer can follow arrives."""
        current = self.registry.get(model_id)
        key = f"follow:{model_id}"
        if current is None or current.version == record.version:
            self.status.report(key, None)
            return
        try:
            old, new = await self._reload(model_id, record.weights_path, record.sha256)
        except Exception as exc:  # whatever the record names, the listener stays up
            message = exc.message if isinstance(exc, ModelLoadError) else repr(exc)
            self.status.report(
                key,
                f"cannot follow the fleet's reload of {model_id} to {record.version}: "
                f"{message}; still serving {current.version}",
            )
            return
        self.status.report(key, None)
        log.info("followed the fleet: %s %s -> %s", model_id, old, new)

    async def listen(self) -> None:
        """Follow announcements until cancelled (resubscribing after a Redis error; the
        hash is synced after each subscription, for anything missed meanwhile)."""
        backoff = Backoff(max_s=RESUBSCRIBE_BACKOFF_MAX_S)
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.control_channel)
                    await self.sync()  # anything announced while we were not listening
                    if backoff.failures:
                        log.info("control channel back after %d failed tries", backoff.failures)
                    backoff.reset()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._on_message(message["data"])
            except RedisError as exc:
                wait_s = backoff.next_s()
                log.warning(
                    "control channel lost (%s); resubscribing in %.1f s (try %d)",
                    exc,
                    wait_s,
                    backoff.failures,
                )
                await asyncio.sleep(wait_s)

    async def _on_message(self, data: bytes) -> None:
        try:
            model_id = ControlMessage.model_validate_json(data[:MAX_RECORD_BYTES]).model_id
        except ValidationError:
            log.warning("ignoring a malformed control message: %r", data[:200])
            return
        raw = await self.redis.hget(self.keys.desired_models, model_id)
        parsed = None if raw is None else parse_record(model_id, raw)
        if parsed is not None:
            await self._follow(*parsed)
