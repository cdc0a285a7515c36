"""Redis's clock, as seen from the consumer.

Stream entry IDs carry their enqueue time on Redis's clock, so deadlines and the
``queued_ms``/``latency_ms`` of replies are measured on that clock. The offset from the
local clock is estimated from several ``TIME`` calls, keeping the one with the smallest round
trip (its error is at most half that round trip), and refreshed every ``REFRESH_S`` by the
worker's supervised ``clock`` task, so a drifting or stepped local clock is followed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

SAMPLES = 5
REFRESH_S = 30.0


class RedisClock:
    """``now_ms()`` on Redis's clock; ``sync()`` re-estimates the offset."""

    def __init__(self) -> None:
        self.offset_ms = 0.0
        self.round_trip_ms: float | None = None
        """Round trip of the sample the offset comes from (its error is at most half)."""

    async def sync(self, redis_time_ms: Callable[[], Awaitable[float]]) -> None:
        """Take ``SAMPLES`` readings of Redis's clock; keep the tightest."""
        best: tuple[float, float] | None = None
        for _ in range(SAMPLES):
            sent_ms = time.time() * 1000
            started_s = time.perf_counter()
            redis_ms = await redis_time_ms()
            round_trip_ms = (time.perf_counter() - started_s) * 1000
            offset_ms = redis_ms - (sent_ms + round_trip_ms / 2)
            if best is None or round_trip_ms < best[0]:
                best = (round_trip_ms, offset_ms)
        assert best is not None
        self.round_trip_ms, self.offset_ms = best

    def now_ms(self) -> float:
        """Now, on Redis's clock (the clock of entry IDs), in ms since the epoch."""
        return time.time() * 1000 + self.offset_ms
