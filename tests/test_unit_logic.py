"""The unit tier's own tests: logic that needs no redis-server, checked in milliseconds. The
producer's sync client runs against fakeredis (where Redis's stream semantics do not matter:
what it writes and how it reads a reply); the CLI's table, the read plan and the entry
records are pure. The real-Redis suite stays the authority on behaviour."""

from __future__ import annotations

import json

import fakeredis
import numpy as np
import pytest
from bales_producer import Client, InvalidRequest, KeySpace, RequestTimeout

from bales_stream.cli import format_report
from bales_stream.processing import MAX_BATCHES_PER_HANDOFF
from bales_stream.worker import MIN_READ_COUNT, ReadPlan

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_client() -> Client:
    return Client("redis://fake", redis_client=fakeredis.FakeRedis(), prefix="unit")


def test_submit_writes_the_documented_fields_on_the_priority_stream(fake_client) -> None:
    request_id = fake_client.submit("stub_v1", [0.5, 1.5], priority=0, timeout_s=2)
    ((_, fields),) = fake_client.redis.xrange(KeySpace("unit").stream(0))
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    assert fields["request_id"] == request_id and fields["model_id"] == "stub_v1"
    assert json.loads(fields["input"]) == [0.5, 1.5]
    assert fields["timeout_ms"] == "2000"


def test_a_numpy_input_goes_as_raw_little_endian_float32(fake_client) -> None:
    fake_client.submit("stub_v1", np.array([1.0, -2.0], dtype=np.float32))
    ((_, fields),) = fake_client.redis.xrange(KeySpace("unit").stream(1))
    assert fields[b"encoding"] == b"f32"
    assert np.frombuffer(fields[b"input"], "<f4").tolist() == [1.0, -2.0]


def test_a_reply_is_read_from_its_key_and_an_error_reply_raises_typed(fake_client) -> None:
    keys = KeySpace("unit")
    ok = {"request_id": "a", "status": "ok", "result": {"label": 3, "confidence": 0.9}}
    fake_client.redis.rpush(keys.reply("a"), json.dumps(ok))
    assert fake_client.result("a", timeout_s=1)["result"]["label"] == 3
    bad = {
        "request_id": "b",
        "status": "error",
        "error": {"code": "invalid_request", "message": "input: expected 128 numbers"},
    }
    fake_client.redis.rpush(keys.reply("b"), json.dumps(bad))
    with pytest.raises(InvalidRequest, match="expected 128 numbers"):
        fake_client.result("b", timeout_s=1)
    with pytest.raises(RequestTimeout):
        fake_client.result("never", timeout_s=0.05)


def test_the_read_plan_reads_twice_a_batch_and_buffers_one_grouped_handoff() -> None:
    plan = ReadPlan.for_batches_of(32)
    assert plan.count == max(64, MIN_READ_COUNT) and plan.share >= 1
    assert plan.buffer_limit == MAX_BATCHES_PER_HANDOFF * 32
    assert ReadPlan.for_batches_of(1).count == MIN_READ_COUNT  # never a read of one


def test_the_info_table_lists_each_queue_and_consumer_and_a_cluster_node_column() -> None:
    queue = {
        "shard": "0",
        "priority": 0,
        "stream": "bales:{requests}:p0",
        "length": 100,
        "lag": 99,
        "pending": 1,
        "oldest_age_s": 6.2,
        "node": None,
    }
    report = {
        "group": "bales",
        "queues": [queue, queue | {"priority": 1, "lag": None, "oldest_age_s": None}],
        "consumers": [{"name": "vm-1", "pending": 1, "idle_ms": 6114}],
    }
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["shard", "priority", "stream", "length", "lag", "pending", "oldest"]
    assert lines[1].split() == ["0", "p0", "bales:{requests}:p0", "100", "99", "1", "6.2s"]
    assert lines[2].split()[4] == "-" and lines[2].split()[-1] == "-"  # unknown: a dash
    assert "consumers in group 'bales': 1" in lines
    clustered = report | {"queues": [queue | {"node": "10.0.0.5:7000"}]}
    header, row = format_report(clustered).splitlines()[:2]
    assert header.endswith("node") and row.endswith("10.0.0.5:7000")
