"""Supervision of a worker's long-lived tasks: read loops, batch loop, lease, reclaim, trim,
control listener, clock.

A task that raises unexpectedly is logged with its traceback, counted
(``bales_task_restarts_total{task}``) and restarted after a backoff that doubles with each
crash inside ``CRASH_WINDOW_S``. While a task is down, or has crashed more than once inside
the window ("restarting in a loop"), ``problems()`` names it, and /ready answers 503. A task
that crashes ``MAX_CRASHES`` times inside the window cannot stay up: ``failed`` is set, and
the service exits non-zero so that the orchestrator restarts the process, rather than idling
while its probes say ok. A task that returns normally (a stop was asked) is not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .backoff import BACKOFF_START_S, delay_s
from .metrics import Metrics

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0
MAX_CRASHES = 5
"""Crashes of one task inside ``CRASH_WINDOW_S`` after which the process gives up."""


@dataclass
class TaskState:
    """What the supervisor knows of one task."""

    up: bool = True
    crashes_s: deque[float] = field(default_factory=deque)
    """Monotonic times of the crashes inside the window."""
    last_error: str | None = None

    def recent_crashes(self, now_s: float) -> int:
        """Crashes inside the window ending ``now_s``."""
        while self.crashes_s and now_s - self.crashes_s[0] > CRASH_WINDOW_S:
            self.crashes_s.popleft()
        return len(self.crashes_s)


class Supervisor:
    """Runs named tasks, restarts them when they crash, and says which are unhealthy."""

    def __init__(self, metrics: Metrics, clock_s: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.failed = asyncio.Event()
        """Set when a task cannot stay up (``MAX_CRASHES`` inside ``CRASH_WINDOW_S``)."""
        self._clock_s = clock_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, TaskState] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` as task ``name``, restarting it whenever it raises."""
        self._states[name] = TaskState()
        self._tasks[name] = asyncio.create_task(self._supervise(name, run), name=f"bales-{name}")

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        state = self._states[name]
        while True:
            state.up = True
            try:
                await run()
                return
            except Exception as exc:
                crashes = self._record_crash(name, state, exc)
                log.error(
                    "task %s crashed (%d times in %.0f s)",
                    name,
                    crashes,
                    CRASH_WINDOW_S,
                    exc_info=True,
                )
            state.up = False
            if crashes >= MAX_CRASHES:
                log.critical("task %s cannot stay up; giving up: the process exits", name)
                self.failed.set()
                return
            backoff_s = delay_s(crashes, BACKOFF_START_S)
            log.info("restarting task %s in %.1f s", name, backoff_s)
            await asyncio.sleep(backoff_s)

    def _record_crash(self, name: str, state: TaskState, exc: Exception) -> int:
        self.metrics.task_restarts.labels(_task_kind(name)).inc()
        state.last_error = f"{type(exc).__name__}: {exc}"[:300]
        now_s = self._clock_s()
        state.crashes_s.append(now_s)
        return state.recent_crashes(now_s)

    def problems(self) -> list[str]:
        """One line per task that is down or restarting in a loop (empty: all healthy)."""
        now_s = self._clock_s()
        found = []
        for name, state in self._states.items():
            crashes = state.recent_crashes(now_s)
            if not state.up:
                found.append(f"task {name} is down ({crashes} crashes; last: {state.last_error})")
            elif crashes > 1:
                found.append(
                    f"task {name} is restarting in a loop ({crashes} crashes in "
                    f"{CRASH_WINDOW_S:.0f} s; last: {state.last_error})"
                )
        return found

    def report(self) -> dict[str, dict[str, object]]:
        """Per task: up, crashes inside the window, last error (for /health)."""
        now_s = self._clock_s()
        return {
            name: {
                "up": state.up,
                "recent_crashes": state.recent_crashes(now_s),
                "last_error": state.last_error,
            }
            for name, state in self._states.items()
        }

    async def join(self, name: str) -> None:
        """Wait until task ``name`` has ended (it returned, or gave up)."""
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def cancel(self, name: str) -> None:
        """Cancel task ``name`` and wait for it."""
        task = self._tasks.pop(name, None)
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop(self) -> None:
        """Cancel every task still running."""
        for name in list(self._tasks):
            await self.cancel(name)


def _task_kind(name: str) -> str:
    """The metric label of a task: ``read-3`` counts as ``read`` (bounded label values)."""
    return name.split("-", 1)[0]
