"""Scoreboard rows for hostile input (``python -m benchmarks.faults --only hostile-...``).

Each row writes what an outside client could write, with plain XADDs, into the streams of
real consumer processes, then checks: every accepted request has exactly one reply (lost 0),
lag and pending drain to 0, a canary is answered, /ready is 200 and no task restarted
(readiness truthful), and the row's own figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .fault_harness import INPUTS, Consumer, Harness, Row

GOOD = json.dumps([0.5] * 128)
BIG_INPUT_BYTES = 8 * 1024 * 1024
BIG_ENTRIES = 20
"""Oversized entries per phase (all at once, then one at a time)."""


async def xadd_all(harness: Harness, entries: list[dict[str, Any]], priority: int = 1) -> None:
    async with harness.redis.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(harness.keys.stream(priority), fields)
        await pipe.execute()


def valid(request_id: str, **extra: str) -> dict[str, Any]:
    return {"request_id": request_id, "model_id": "stub_v1", "input": GOOD, **extra}


async def reply(harness: Harness, request_id: str) -> dict[str, Any]:
    raw = await harness.redis.lindex(harness.keys.reply(request_id), 0)
    return json.loads(raw) if raw else {}


async def codes(harness: Harness, ids: list[str]) -> dict[str, int]:
    """How many of ``ids`` got each outcome (``ok`` or the error code)."""
    counted: dict[str, int] = {}
    for request_id in ids:
        document = await reply(harness, request_id)
        code = document.get("error", {}).get("code") or document.get("status", "none")
        counted[code] = counted.get(code, 0) + 1
    return counted


async def truthful(harness: Harness, consumer: Consumer, row: Row) -> None:
    """A canary is answered, /ready is 200 and no task restarted (else the row fails)."""
    await xadd_all(harness, [valid("canary")], priority=2)
    await harness.wait_answered(["canary"], timeout_s=30)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{consumer.port}/ready") as ready,
        session.get(f"http://127.0.0.1:{consumer.port}/metrics") as metrics,
    ):
        status, text = ready.status, await metrics.text()
    restarts = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("bales_task_restarts_total{")
    )
    canary_ok = (await reply(harness, "canary")).get("status") == "ok"
    row.figures.update({"canary": "ok" if canary_ok else "MISSING", "ready": status})
    row.figures["task_restarts"] = int(restarts)
    row.ok = row.ok and canary_ok and status == 200 and restarts == 0 and consumer.alive


async def odd_timeouts() -> Row:
    """10. 1,000 valid requests and 100 with a timeout_ms of non-ASCII digits."""
    row = Row("10 timeout_ms '²'/'٣' x100")
    async with Harness() as harness:
        consumer = await harness.add_consumer()
        entries = [valid(f"v-{i}") for i in range(1000)]
        odd = [valid(f"o-{i}", timeout_ms="²" if i % 2 else "٣٠٠٠") for i in range(100)]
        await xadd_all(harness, [e for pair in zip(entries[::10], odd, strict=True) for e in pair])
        await xadd_all(harness, [e for i, e in enumerate(entries) if i % 10])
        ids = [e["request_id"] for e in entries + odd]
        await harness.verdict(row, ids)
        outcome = await codes(harness, [e["request_id"] for e in odd])
        row.figures["odd_replies"] = outcome
        row.ok = row.ok and outcome == {"invalid_request": 100}
        await truthful(harness, consumer, row)
    return row


async def squatted_keys() -> Row:
    """11. reply_to inboxes and reply keys that clients made into other types."""
    row = Row("11 squatted reply/inbox keys x100")
    async with Harness() as harness:
        consumer = await harness.add_consumer()
        kinds = ("set", "hset", "sadd", "zadd")
        for i in range(50):
            await _squat(harness, harness.keys.inbox(f"taken-{i}"), kinds[i % 4])
            await _squat(harness, harness.keys.reply(f"sq-{i}"), kinds[i % 4])
        entries = [
            valid(f"v-{i}", reply_to=harness.keys.inbox(f"taken-{i % 50}")) for i in range(500)
        ]
        entries += [valid(f"sq-{i}") for i in range(50)]
        await xadd_all(harness, entries)
        await harness.verdict(row, [f"v-{i}" for i in range(500)])
        pending = sum(await harness.lag_and_pending())
        row.figures["squatted_left_intact"] = await _intact(harness)
        row.ok = row.ok and pending == 0 and row.figures["squatted_left_intact"] == 100
        await truthful(harness, consumer, row)
    return row


async def _squat(harness: Harness, key: str, kind: str) -> None:
    writers = {
        "set": lambda: harness.redis.set(key, "x"),
        "hset": lambda: harness.redis.hset(key, "f", "v"),
        "sadd": lambda: harness.redis.sadd(key, "m"),
        "zadd": lambda: harness.redis.zadd(key, {"m": 1}),
    }
    await writers[kind]()


async def _intact(harness: Harness) -> int:
    """Squatted keys still of their own type and without a TTL."""
    keys = [harness.keys.inbox(f"taken-{i}") for i in range(50)]
    keys += [harness.keys.reply(f"sq-{i}") for i in range(50)]
    intact = 0
    for key in keys:
        kind = (await harness.redis.type(key)).decode()
        intact += kind != "list" and await harness.redis.ttl(key) == -1
    return intact


async def restart_with_poison() -> Row:
    """12. Junk fleet records and poison in a consumer's own pending list; it restarts under
    the same name (as Kubernetes restarts a pod)."""
    row = Row("12 junk fleet records + restart w/ poison")
    async with Harness() as harness:
        await harness.redis.hset(
            harness.keys.desired_models, mapping={"stub_v1": "junk", "x y": "{}"}
        )
        poison = [valid(f"p-{i}", timeout_ms="²") for i in range(20)]
        poison += [valid(f"big-{i}", input="9" * (2 * 1024 * 1024)) for i in range(5)]
        good = [valid(f"g-{i}", timeout_ms="600000") for i in range(200)]
        await xadd_all(harness, poison + good)
        await harness.redis.xgroup_create(harness.keys.stream(1), "bales", id="0", mkstream=True)
        await harness.redis.xreadgroup("bales", "c0", {harness.keys.stream(1): ">"}, count=1000)
        consumer = await harness.add_consumer()  # named c0: the one that read them
        await harness.verdict(row, [e["request_id"] for e in poison + good])
        row.figures["poison_replies"] = await codes(harness, [e["request_id"] for e in poison])
        row.ok = row.ok and row.figures["poison_replies"] == {"invalid_request": 25}
        await truthful(harness, consumer, row)
    return row


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


async def oversized() -> Row:
    """13. 8 MiB inputs (MAX_INPUT_BYTES 1 MiB): 20 sent at once, then 20 one at a time
    (each wakes the blocking read); the consumer's peak memory must not grow with them."""
    row = Row("13 oversized 2x20 x 8 MiB")
    async with Harness() as harness:
        consumer = await harness.add_consumer()
        assert consumer.process is not None
        await xadd_all(harness, [valid("warm-up")])
        await harness.wait_answered(["warm-up"])
        baseline_mb = peak_rss_mb(consumer.process.pid)
        big = "9" * BIG_INPUT_BYTES
        await xadd_all(harness, [valid(f"b-{i}", input=big) for i in range(BIG_ENTRIES)])
        for i in range(BIG_ENTRIES):
            await xadd_all(harness, [valid(f"a-{i}", input=big)])
            await harness.wait_answered([f"a-{i}"])
        ids = [f"{tag}-{i}" for tag in "ba" for i in range(BIG_ENTRIES)]
        await harness.verdict(row, ids)
        growth_mb = peak_rss_mb(consumer.process.pid) - baseline_mb
        outcome = await codes(harness, ids)
        row.figures.update({"replies": outcome, "peak_rss_growth_mb": f"{growth_mb:.1f}"})
        row.ok = row.ok and outcome == {"invalid_request": 2 * BIG_ENTRIES} and growth_mb < 64
        await truthful(harness, consumer, row)
    return row


async def future_ids() -> Row:
    """14. Entries with IDs an hour ahead of Redis's clock, then '*' entries with a 1 ms
    timeout on the same stream: durations never negative, deadlines still shed."""
    row = Row("14 entry IDs 1 h ahead of the clock")
    async with Harness() as harness:
        consumer = await harness.add_consumer()
        ahead_ms = int(time.time() * 1000) + 3_600_000
        async with harness.redis.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.xadd(harness.keys.stream(1), valid(f"f-{i}"), id=f"{ahead_ms}-{i}")
            await pipe.execute()
        await xadd_all(harness, [valid(f"s-{i}", timeout_ms="1") for i in range(300)])
        ids = [f"f-{i}" for i in range(100)] + [f"s-{i}" for i in range(300)]
        await harness.verdict(row, ids)
        documents = [await reply(harness, request_id) for request_id in ids]
        negative = sum(d.get("queued_ms", 0) < 0 or d.get("latency_ms", 0) < 0 for d in documents)
        late_ok = sum(d.get("status") == "ok" and d["queued_ms"] > 1 for d in documents[100:])
        row.figures.update({"negative_durations": negative, "ok_after_deadline": late_ok})
        row.figures["short_replies"] = await codes(harness, ids[100:])
        row.ok = row.ok and negative == 0 and late_ok == 0
        await truthful(harness, consumer, row)
    return row


async def non_finite() -> Row:
    """15. Valid float32 inputs that overflow the model (3e38): an error, never ok/null."""
    row = Row("15 overflowing inputs x100")
    async with Harness() as harness:
        consumer = await harness.add_consumer()
        overflow = json.dumps([3e38] * 128)
        entries = [
            valid(f"n-{i}", input=overflow)
            if i % 10 == 0
            else {
                "request_id": f"n-{i}",
                "model_id": "stub_v1",
                "encoding": "f32",
                "input": INPUTS[i % 256].tobytes(),
            }
            for i in range(1000)
        ]
        await xadd_all(harness, entries)
        ids = [f"n-{i}" for i in range(1000)]
        await harness.verdict(row, ids)
        row.figures["overflow_replies"] = await codes(harness, ids[::10])
        row.figures["other_replies"] = await codes(
            harness, [i for n, i in enumerate(ids) if n % 10]
        )
        row.ok = (
            row.ok
            and row.figures["overflow_replies"] == {"invalid_output": 100}
            and row.figures["other_replies"] == {"ok": 900}
        )
        await truthful(harness, consumer, row)
    return row


def ignoring_args(
    row: Callable[[], Awaitable[Row]],
) -> Callable[[argparse.Namespace], Awaitable[Row]]:
    """A row as a ``faults.SCENARIOS`` entry (those take the command-line arguments)."""
    return lambda args: row()


SCENARIOS: dict[str, Callable[[], Awaitable[Row]]] = {
    "hostile-timeout": odd_timeouts,
    "hostile-squat": squatted_keys,
    "hostile-restart": restart_with_poison,
    "hostile-oversized": oversized,
    "hostile-future": future_ids,
    "hostile-nonfinite": non_finite,
}
