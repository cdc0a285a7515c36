"""Dynamic batching per model, with priority preference and aging. No Redis in here.

``put()`` adds a request; ``next_batch()`` returns a batch of one model as soon as that model
has ``max_batch_size`` requests waiting, or ``window_ms`` after the oldest of them arrived.
Requests share a batch only when they share a ``batch_key``: the model, and for a model with
variable-length inputs the request's length bucket, so a batch pads little.

The window is adaptive: it is only waited for when waiting can pay. When the model has no
batch in flight, its requests go at once: waiting would only add latency, and under load
batches fill by themselves while earlier ones run (so at saturation they are full anyway).

Which requests go into a batch (the priority rule):
1. A request that has waited in the batcher longer than ``aging_ms`` goes first, oldest first,
   whatever its priority, so a p0 flood can delay a p2 request but never starve it.
2. Otherwise the highest priority goes first (p0 before p1 before p2), oldest first within a
   level, so a p0 request never waits behind a backlog of p2.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Batchable(Protocol):
    """What the batcher needs from an item."""

    @property
    def model_id(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def batch_key(self) -> str:
        """Items with equal keys may share a batch (all of one model)."""
        ...


T = TypeVar("T", bound=Batchable)


class _ModelQueue(Generic[T]):
    """Waiting items of one batch key: one FIFO per priority level, with arrival times."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.levels: list[deque[tuple[float, T]]] = []
        self.count = 0

    def push(self, arrival_s: float, item: T) -> None:
        while len(self.levels) <= item.priority:
            self.levels.append(deque())
        self.levels[item.priority].append((arrival_s, item))
        self.count += 1

    def oldest_arrival_s(self) -> float:
        return min(level[0][0] for level in self.levels if level)

    def pop_next(self, aged_before_s: float) -> T:
        """Remove the next item by the priority rule (see the module docstring)."""
        aged: deque[tuple[float, T]] | None = None
        for level in self.levels:
            if (
                level
                and level[0][0] <= aged_before_s
                and (aged is None or level[0][0] < aged[0][0])
            ):
                aged = level
        chosen = aged or next(level for level in self.levels if level)
        self.count -= 1
        return chosen.popleft()[1]


class Batcher(Generic[T]):
    """Groups items into per-model batches; see the module docstring for the rules."""

    def __init__(
        self,
        max_batch_size: int,
        window_ms: float,
        aging_ms: float,
        clock: Callable[[], float] = time.monotonic,
        adaptive: bool = True,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.window_s = window_ms / 1000
        self.aging_s = aging_ms / 1000
        self._clock = clock
        self.adaptive = adaptive
        self._queues: dict[str, _ModelQueue[T]] = {}
        self._limits: dict[str, tuple[int, float]] = {}
        self._size = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    def set_limits(self, model_id: str, max_batch_size: int, window_ms: float) -> None:
        """Give one model its own batch size and window (others keep the defaults)."""
        self._limits[model_id] = (max_batch_size, window_ms / 1000)

    def _limits_of(self, model_id: str) -> tuple[int, float]:
        return self._limits.get(model_id, (self.max_batch_size, self.window_s))

    def put(self, item: T) -> None:
        """Add one item; wakes ``next_batch`` if this completes a batch."""
        queue = self._queues.get(item.batch_key)
        if queue is None:
            queue = self._queues[item.batch_key] = _ModelQueue(item.model_id)
        queue.push(self._clock(), item)
        self._size += 1
        self._changed.set()

    async def next_batch(
        self, in_flight: Callable[[str], int] | None = None, max_in_flight: int = 0
    ) -> list[T]:
        """Wait for the next ready batch and return it.

        ``in_flight(model_id)`` tells how many batches of a model are running: with
        ``adaptive``, a model with none goes at once; with ``max_in_flight``, a model with
        that many is passed over until ``wake()``, so one slow model cannot take every slot.
        """
        while True:
            now_s = self._clock()
            key, ready_at_s = self._most_urgent(now_s, in_flight, max_in_flight)
            if key is not None and ready_at_s <= now_s:
                return self._take(key, now_s)
            self._changed.clear()
            wait_s = None if key is None else ready_at_s - now_s
            try:
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def wait_for_room(self, capacity: int) -> None:
        """Wait until fewer than ``capacity`` items per batch key are waiting (reader
        back-pressure): requests split over several keys (models, length buckets) still
        fill their batches."""
        while self._size >= capacity * max(1, len(self._queues)):
            self._room.clear()
            await self._room.wait()

    def take_full(self, model_id: str, most: int) -> list[list[T]]:
        """Remove and return up to ``most`` batches of ``model_id`` that are full now (any of
        its batch keys), by the priority rule within each key (for a grouped hand-off)."""
        batches: list[list[T]] = []
        now_s = self._clock()
        while len(batches) < most:
            key = next(
                (
                    key
                    for key, queue in self._queues.items()
                    if queue.model_id == model_id and queue.count >= self._limits_of(model_id)[0]
                ),
                None,
            )
            if key is None:
                break
            batches.append(self._take(key, now_s))
        return batches

    def take_all(self) -> list[list[T]]:
        """Remove and return everything waiting, as batches (for a graceful stop)."""
        batches = []
        while self._queues:
            key = next(iter(self._queues))
            batches.append(self._take(key, self._clock()))
        return batches

    def wake(self) -> None:
        """Make a waiting ``next_batch`` look again (e.g. a busy model has become free)."""
        self._changed.set()

    def _most_urgent(
        self, now_s: float, in_flight: Callable[[str], int] | None, max_in_flight: int
    ) -> tuple[str | None, float]:
        best: tuple[str | None, float] = (None, float("inf"))
        for key, queue in self._queues.items():
            running = in_flight(queue.model_id) if in_flight is not None else None
            if max_in_flight and running is not None and running >= max_in_flight:
                continue
            max_batch_size, window_s = self._limits_of(queue.model_id)
            if queue.count >= max_batch_size or (self.adaptive and running == 0):
                ready_at_s = now_s
            else:
                ready_at_s = queue.oldest_arrival_s() + window_s
            if ready_at_s < best[1]:
                best = (key, ready_at_s)
        return best

    def _take(self, key: str, now_s: float) -> list[T]:
        queue = self._queues[key]
        aged_before_s = now_s - self.aging_s
        size = min(queue.count, self._limits_of(queue.model_id)[0])
        batch = [queue.pop_next(aged_before_s) for _ in range(size)]
        if queue.count == 0:
            del self._queues[key]
        self._size -= len(batch)
        self._room.set()
        return batch
