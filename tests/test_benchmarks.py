"""The load generator's bookkeeping (not a timed test: it checks counts, not speed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import ab_drain, load, peer_lanes, sync_client, text_model


async def test_open_loop_load_split_over_producer_processes_is_merged(redis_url, prefix) -> None:
    args = load.build_parser().parse_args(
        [
            "--mode=open",
            "--rate=200",
            "--duration-s=1",
            "--producers=2",
            f"--redis-url={redis_url}",
            f"--prefix={prefix}",
        ]
    )
    result = await load.run(args)
    assert result["requests"] == 200 and result["errors"] == {}
    assert result["producers"] == 2
    assert sorted(result["latency_curve_ms"]) == ["0", "1", "2"]
    assert result["cpu_us_per_request"]["producer"] > 0
    assert result["latency_ms_all"]["p50"] > 0


async def test_the_text_model_benchmark_runs_the_loop_and_the_service_on_the_same_texts(
    redis_server,
) -> None:
    items = text_model.texts(40)
    model = text_model.load()
    loop_per_s, loop_cpu_us = text_model.loop_rate(model, items, pool=2, intra=1, size=8)
    run = await text_model.service_rate(redis_server, items, pool=2, intra=1, size=8)
    assert loop_per_s > 0 and loop_cpu_us > 0
    assert run.rate > 0 and run.consumer_us > 0 and run.redis_us > 0  # every reply came back
    assert 1 <= run.batch <= 8 and run.waste >= 0
    assert sum(len(b) for b in text_model.batches(items, 8)) == len(items)


async def test_the_ab_drain_alternates_checkouts_and_drains_every_request() -> None:
    root = str(Path(__file__).resolve().parents[1])
    args = argparse.Namespace(
        contenders=[root, f"{root}|THREAD_POOL_SIZE=1"], rounds=2, consumers=1, requests=300
    )
    results = await ab_drain.run(args)  # returns once every entry of every round is acked
    assert list(results) == [root, f"{root} THREAD_POOL_SIZE=1"]
    for rounds in results.values():
        assert len(rounds) == 2
        assert all(
            rate > 0 and consumers_us > 0 and redis_us > 0
            for rate, consumers_us, redis_us in rounds
        )


@pytest.mark.parametrize("name", peer_lanes.SUBPROCESS_PEERS)
async def test_each_task_queue_peer_serves_the_stub_from_its_own_virtualenv(
    redis_url, name
) -> None:
    """The Celery and arq peers of ``benchmarks.peers`` start a worker, answer every request
    of a short saturating run and stop (``make test`` builds ``.venv-peers``)."""
    args = argparse.Namespace(duration_s=1.0, in_flight=8, poll_s=0.01)
    figures = await peer_lanes.subprocess_peer(name, redis_url, args)
    assert figures["errors"] == 0
    assert figures["throughput"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0


async def test_the_sync_client_benchmark_answers_every_request_both_ways() -> None:
    rounds = await sync_client.run(argparse.Namespace(rounds=1, requests=40))
    assert set(rounds) == {"infer", "submit-all"}
    for (figures,) in rounds.values():
        assert figures["req_s"] > 0 and figures["cpu_us"] > 0
