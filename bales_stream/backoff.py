"""The one retry policy of the service: waits that double after each consecutive failure,
from ``BACKOFF_START_S`` up to a cap, and start over after a success. Used by the read
loops, group joining, completion, the control channel and the task supervisor."""

from __future__ import annotations

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0


def delay_s(failures: int, start_s: float = BACKOFF_START_S, max_s: float = BACKOFF_MAX_S) -> float:
    """The wait after ``failures`` consecutive failures (1: ``start_s``; doubling; at most
    ``max_s``)."""
    return min(start_s * 2 ** max(failures - 1, 0), max_s)


class Backoff:
    """Consecutive failures of one retried operation, and the wait each one earns."""

    def __init__(self, start_s: float = BACKOFF_START_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.start_s = start_s
        self.max_s = max_s
        self.failures = 0

    def next_s(self) -> float:
        """Count one more failure; the wait before retrying."""
        self.failures += 1
        return delay_s(self.failures, self.start_s, self.max_s)

    def reset(self) -> None:
        """The operation succeeded: the next failure waits ``start_s`` again."""
        self.failures = 0
