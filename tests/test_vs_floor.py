"""The floor benchmark's bookkeeping (not a timed test: it checks counts, not speed)."""

from __future__ import annotations

from bales_producer.core import ClientCore

from benchmarks import vs_floor

PHASES = {"saturate": "sat", "open-500": "o500"}
"""The quick run's phases: figure name -> the phase tag in its request ids."""


async def test_the_floor_and_bales_stream_answer_every_request_of_a_quick_run(
    redis_server, prefix
) -> None:
    args = vs_floor.parse_args(["--quick", f"--redis-url={redis_server.url}", f"--prefix={prefix}"])
    result = await vs_floor.run(args)

    for contender in vs_floor.CONTENDERS:
        (figures,) = result["rounds"][contender]
        assert figures["xadds_ok"]
        for phase in PHASES:
            stats = figures[phase]
            assert stats["requests"] == 500
            # ok: read back and passed ClientCore.decode_reply and ClientCore.check
            assert stats["answered"] == stats["ok"] == 500, (contender, phase, stats)
            assert stats["missing"] == stats["duplicates"] == stats["pushed_twice"] == 0
            assert stats["errors"] == {}
    for key in ("saturate throughput", "open-500 p50_ms", "open-500 p99_ms"):
        row = result["summary"][key]
        assert row["floor"]["median"] > 0 and row["bales"]["median"] > 0 and row["ratio"] > 0
    for contender in vs_floor.CONTENDERS:
        assert result["summary"]["saturate consumer_cpu_us"][contender]["median"] > 0

    (floor,) = result["rounds"]["floor"]
    for phase, tag in PHASES.items():  # a floor reply as a client reads it
        reply = ClientCore.check(ClientCore.decode_reply(floor[phase]["sample_reply"]))
        assert reply["request_id"] == vs_floor.request_id(tag, 0)
        assert reply["model_id"] == "stub_v1" and reply["priority"] == vs_floor.PRIORITY_CYCLE[0]
        assert set(reply["result"]) == {"label", "confidence"} and reply["batch_size"] >= 1
