"""Dead letters: how an entry that cannot or must not be answered normally leaves the queue.

One home for the policy: ``move`` puts an entry on its shard's dead-letter stream (capped,
with a bounded copy of its fields and the reason) and acks it, writing its client's error
reply in the same step when there is a client to tell. Callers: admission (an entry
without a usable ``request_id``, or one the service failed on) and recovery (``give_up``:
an entry delivered ``MAX_DELIVERIES`` times without an answer, a poison request).
"""

from __future__ import annotations

import logging

from bales_producer import wire

from .metrics import Metrics
from .protocol import read_envelope
from .registry import ModelRegistry
from .replies import Completion, error_completion
from .settings import Settings
from .shards import ShardedStreams, shard_label
from .status import WorkerStatus
from .streams import StreamEntry

log = logging.getLogger(__name__)


class DeadLetters:
    """Moves entries to the dead-letter streams of one consumer's shards."""

    def __init__(
        self,
        streams: ShardedStreams,
        settings: Settings,
        metrics: Metrics,
        status: WorkerStatus,
        registry: ModelRegistry,
    ) -> None:
        self.streams = streams
        self.settings = settings
        self.metrics = metrics
        self.status = status
        self.registry = registry

    async def move(self, entry: StreamEntry, reason: str, reply: Completion | None = None) -> None:
        """Move an entry to its shard's dead-letter stream, acked (with ``reply``, its
        client's error reply is written in the same step)."""
        log.warning(
            "dead-lettering entry %s of p%d: %s",
            entry.entry_id,
            entry.priority,
            reason,
            extra={"entry_id": entry.entry_id, "priority": entry.priority},
        )
        recorded = await self.streams.dead_letter(entry, reason, reply)
        self.status.report(
            f"dead-letter:{entry.shard}",
            None
            if recorded
            else f"the dead-letter stream of shard {shard_label(entry.shard)} cannot take "
            f"records (a key of another type?): entry {entry.entry_id} of p{entry.priority} "
            "was acked without a record",
        )
        self.metrics.dead_letters.inc()

    async def give_up(self, entry: StreamEntry, deliveries: int) -> None:
        """Dead-letter an entry delivered MAX_DELIVERIES times without an answer (the model
        raised on it, or the consumer holding it stopped: a request that kills its consumer
        is poison too), and tell its client."""
        reason = (
            f"delivered {deliveries - 1} times without an answer (MAX_DELIVERIES="
            f"{self.settings.max_deliveries}); moved to "
            f"{self.streams.store(entry.shard).keys.dead_letter}"
        )
        try:
            envelope = read_envelope(
                entry.entry_id,
                entry.fields,
                entry.priority,
                self.settings.keys,
                entry.shard,
                entry.withheld,
            )
        except Exception:  # no usable request_id: nobody to tell
            await self.move(entry, reason)
            return
        reply = error_completion(envelope, wire.ERROR_DEAD_LETTER, reason)
        await self.move(entry, reason, reply)
        self.metrics.count(self.registry.metric_label(envelope.model_id), wire.ERROR_DEAD_LETTER)
