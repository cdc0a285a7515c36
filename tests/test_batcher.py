"""The batcher on its own: size- and window-triggered batches, priority and aging."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from bales_stream.batcher import Batcher

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)


@dataclass(frozen=True)
class Item:
    name: str
    model_id: str = "m"
    priority: int = 1
    bucket: int = 0

    @property
    def batch_key(self) -> str:
        return f"{self.model_id}#{self.bucket}"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


async def test_full_batch_is_returned_without_waiting_for_the_window() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=4, window_ms=10_000, aging_ms=1000)
    for i in range(6):
        batcher.put(Item(str(i)))
    started = time.monotonic()
    batch = await asyncio.wait_for(batcher.next_batch(), timeout=1)
    assert [item.name for item in batch] == ["0", "1", "2", "3"]
    assert time.monotonic() - started < 1
    assert len(batcher) == 2


async def test_partial_batch_is_returned_when_the_window_closes() -> None:
    window_ms = 50
    batcher: Batcher[Item] = Batcher(max_batch_size=32, window_ms=window_ms, aging_ms=1000)
    started = time.monotonic()
    batcher.put(Item("a"))
    batcher.put(Item("b"))
    batch = await asyncio.wait_for(batcher.next_batch(), timeout=2)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert [item.name for item in batch] == ["a", "b"]
    assert elapsed_ms >= window_ms * 0.9
    assert elapsed_ms < window_ms + 500


async def test_a_put_that_fills_the_batch_wakes_a_waiting_consumer() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=3, window_ms=10_000, aging_ms=1000)
    waiting = asyncio.create_task(batcher.next_batch())
    batcher.put(Item("a"))
    await asyncio.sleep(0)
    assert not waiting.done()
    batcher.put(Item("b"))
    batcher.put(Item("c"))
    batch = await asyncio.wait_for(waiting, timeout=1)
    assert len(batch) == 3


async def test_an_idle_model_does_not_wait_for_the_window() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=32, window_ms=10_000, aging_ms=1000)
    batcher.put(Item("alone"))
    started = time.monotonic()
    batch = await asyncio.wait_for(batcher.next_batch(lambda model_id: 0), timeout=1)
    assert [item.name for item in batch] == ["alone"]
    assert time.monotonic() - started < 1  # it did not wait for the 10 s window


async def test_a_busy_model_waits_for_its_window_or_a_full_batch() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=3, window_ms=10_000, aging_ms=1000)
    batcher.put(Item("a"))
    waiting = asyncio.create_task(batcher.next_batch(lambda model_id: 1))
    await asyncio.sleep(0)
    assert not waiting.done()  # a batch of this model is running: this one fills meanwhile
    batcher.put(Item("b"))
    batcher.put(Item("c"))
    assert len(await asyncio.wait_for(waiting, timeout=1)) == 3


async def test_a_model_at_its_in_flight_cap_is_passed_over() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=1, window_ms=0, aging_ms=1000)
    running = {"slow": 3, "fast": 0}
    batcher.put(Item("s", model_id="slow"))
    batcher.put(Item("f", model_id="fast"))
    first = await batcher.next_batch(running.__getitem__, max_in_flight=3)
    assert first[0].model_id == "fast"
    waiting = asyncio.create_task(batcher.next_batch(running.__getitem__, max_in_flight=3))
    await asyncio.sleep(0)
    assert not waiting.done()
    running["slow"] = 2
    batcher.wake()
    assert (await asyncio.wait_for(waiting, timeout=1))[0].model_id == "slow"


async def test_batches_never_mix_models() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=8, window_ms=0, aging_ms=1000)
    for i in range(3):
        batcher.put(Item(f"a{i}", model_id="a"))
        batcher.put(Item(f"b{i}", model_id="b"))
    first = await batcher.next_batch()
    second = await batcher.next_batch()
    assert {item.model_id for item in first} == {"a"}
    assert {item.model_id for item in second} == {"b"}
    assert len(first) == len(second) == 3


async def test_higher_priority_goes_first_even_behind_a_backlog() -> None:
    clock = FakeClock()
    batcher: Batcher[Item] = Batcher(max_batch_size=4, window_ms=5, aging_ms=100, clock=clock)
    for i in range(20):
        batcher.put(Item(f"p2-{i}", priority=2))
    batcher.put(Item("p1", priority=1))
    batcher.put(Item("p0", priority=0))
    batch = await batcher.next_batch()
    assert [item.name for item in batch] == ["p0", "p1", "p2-0", "p2-1"]


async def test_an_aged_low_priority_request_beats_a_fresh_flood() -> None:
    clock = FakeClock()
    batcher: Batcher[Item] = Batcher(max_batch_size=4, window_ms=5, aging_ms=100, clock=clock)
    batcher.put(Item("old-p2", priority=2))
    clock.now_s += 0.101  # the p2 request has now waited longer than aging_ms
    for i in range(10):
        batcher.put(Item(f"p0-{i}", priority=0))
    batch = await batcher.next_batch()
    assert batch[0].name == "old-p2"
    assert [item.name for item in batch[1:]] == ["p0-0", "p0-1", "p0-2"]


async def test_without_aging_the_flood_would_go_first() -> None:
    # Control for the test above: same scenario, but the p2 request is not yet aged.
    clock = FakeClock()
    batcher: Batcher[Item] = Batcher(max_batch_size=4, window_ms=5, aging_ms=100, clock=clock)
    batcher.put(Item("young-p2", priority=2))
    clock.now_s += 0.05
    for i in range(10):
        batcher.put(Item(f"p0-{i}", priority=0))
    batch = await batcher.next_batch()
    assert "young-p2" not in [item.name for item in batch]


async def test_wait_for_room_blocks_until_a_batch_is_taken() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=2, window_ms=0, aging_ms=1000)
    for i in range(4):
        batcher.put(Item(str(i)))
    room = asyncio.create_task(batcher.wait_for_room(4))
    await asyncio.sleep(0)
    assert not room.done()
    await batcher.next_batch()
    await asyncio.wait_for(room, timeout=1)


def test_take_all_returns_everything_in_batches() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=2, window_ms=1000, aging_ms=1000)
    for i in range(5):
        batcher.put(Item(str(i), model_id="a" if i % 2 else "b"))
    batches = batcher.take_all()
    assert sorted(item.name for batch in batches for item in batch) == ["0", "1", "2", "3", "4"]
    assert all(len(batch) <= 2 and len({i.model_id for i in batch}) == 1 for batch in batches)
    assert len(batcher) == 0


@pytest.mark.parametrize("max_batch_size", [1, 7, 32])
async def test_every_item_comes_out_exactly_once(max_batch_size: int) -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size, window_ms=0, aging_ms=10)
    names = [str(i) for i in range(100)]
    for i, name in enumerate(names):
        batcher.put(Item(name, priority=i % 3))
    seen = []
    while len(batcher):
        batch = await batcher.next_batch()
        assert 1 <= len(batch) <= max_batch_size
        seen += [item.name for item in batch]
    assert sorted(seen) == sorted(names)


def test_take_full_takes_only_full_batches_of_the_model_by_priority() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=2, window_ms=10_000, aging_ms=10_000)
    for i in range(5):  # two full batches and one left over in bucket 0
        batcher.put(Item(f"a{i}", priority=2 if i < 3 else 0))
    batcher.put(Item("b0", bucket=8))  # another key of the model: not full
    batcher.put(Item("x0", model_id="other"))
    batcher.put(Item("x1", model_id="other"))  # full, but of another model
    batches = batcher.take_full("m", most=5)
    assert [[item.name for item in batch] for batch in batches] == [["a3", "a4"], ["a0", "a1"]]
    assert batcher.take_full("m", most=5) == []  # what is left is not full
    assert len(batcher) == 4
    assert batcher.take_full("other", most=0) == []


def test_take_full_stops_at_most() -> None:
    batcher: Batcher[Item] = Batcher(max_batch_size=1, window_ms=10_000, aging_ms=10_000)
    for i in range(3):
        batcher.put(Item(str(i)))
    assert len(batcher.take_full("m", most=2)) == 2 and len(batcher) == 1
