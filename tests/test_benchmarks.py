"""The load generator's bookkeeping (not a timed test: it checks counts, not speed)."""

from __future__ import annotations

from benchmarks import load


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
