"""The supervisor of long-lived tasks, with plain asyncio (no Redis)."""

from __future__ import annotations

import asyncio

import pytest

from bales_stream import supervisor as supervision
from bales_stream.metrics import Metrics
from bales_stream.supervisor import Supervisor

from .conftest import wait_for

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)


class FakeClock:
    """A monotonic clock the test moves by hand (the crash window is 60 s)."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def restarts(metrics: Metrics, kind: str) -> float:
    return metrics.task_restarts.labels(kind)._value.get()


async def test_a_crashing_task_is_restarted_counted_and_reported(monkeypatch) -> None:
    monkeypatch.setattr(supervision, "BACKOFF_START_S", 0.001)
    metrics, clock = Metrics(), FakeClock()
    supervisor = Supervisor(metrics, clock)
    runs: list[int] = []
    release = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError(f"crash {len(runs)}")
        await release.wait()  # the third run stays up

    supervisor.start("read-0", flaky)
    await wait_for(lambda: len(runs) == 3)
    assert restarts(metrics, "read") == 2  # counted by kind: read-0 -> read
    [problem] = supervisor.problems()
    assert "task read-0 is restarting in a loop (2 crashes" in problem and "crash 2" in problem
    assert supervisor.report()["read-0"] == {
        "up": True,
        "recent_crashes": 2,
        "last_error": "RuntimeError: crash 2",
    }
    clock.now_s += supervision.CRASH_WINDOW_S + 1  # the crashes age out of the window
    assert supervisor.problems() == []
    release.set()
    await supervisor.join("read-0")  # returned normally: not restarted
    assert len(runs) == 3 and not supervisor.failed.is_set()


async def test_a_task_that_cannot_stay_up_sets_failed(monkeypatch) -> None:
    monkeypatch.setattr(supervision, "BACKOFF_START_S", 0.001)
    supervisor = Supervisor(Metrics(), FakeClock())
    calls: list[None] = []

    async def broken() -> None:
        calls.append(None)
        raise ValueError("always")

    supervisor.start("trim", broken)
    await asyncio.wait_for(supervisor.failed.wait(), timeout=10)
    assert len(calls) == supervision.MAX_CRASHES
    assert "task trim is down" in supervisor.problems()[0]


async def test_stop_cancels_a_task_waiting_to_restart() -> None:
    supervisor = Supervisor(Metrics(), FakeClock())
    started = asyncio.Event()

    async def crash_once() -> None:
        started.set()
        raise RuntimeError("boom")

    supervisor.start("clock", crash_once)
    await started.wait()
    await wait_for(lambda: supervisor.problems())  # down, waiting BACKOFF_START_S
    await asyncio.wait_for(supervisor.stop(), timeout=5)  # cancels the backoff sleep
    assert not supervisor.failed.is_set()


def test_restart_and_undeliverable_counters_exist_at_zero_before_any_event() -> None:
    """So that increase() in an alert sees the first event (a series born at 1 reads 0)."""
    text = Metrics().exposition().decode()
    for kind in ("read", "batch", "lease", "reclaim", "trim", "control", "clock"):
        assert f'bales_task_restarts_total{{task="{kind}"}} 0.0' in text
    for key in ("reply", "inbox"):
        assert f'bales_undeliverable_replies_total{{key="{key}"}} 0.0' in text
