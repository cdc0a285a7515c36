"""The hostile-input campaign: property-based entries against a live service process.

Hypothesis writes arbitrary entries with a plain XADD (every field absent, empty, huge,
non-UTF-8, non-ASCII digits, another type of key behind ``reply_to`` or the reply key,
explicit and future entry IDs, duplicate and unknown fields; typed inputs as arbitrary
safetensors documents, JSON objects and text for the shipped demo models) into the streams
of a real ``bales-stream serve`` process on a real redis-server. After each one a canary
request must be answered within a bound, nothing may stay pending, and /ready must be 200 with
no task problem. Then the process is killed, poison is left in its own pending list, and a process
restarted under the same consumer name must answer all of it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis
import safetensors.numpy
from bales_producer import KeySpace, wire
from bales_producer.core import ClientCore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bales_stream.embedded_redis import free_port

from .conftest import ROOT
from .test_service import service_env

CONSUMER = "campaign-consumer"
CANARY_BOUND_S = 10.0
SETTLED_BOUND_S = 3.0
"""Every entry is answered and acked within this (far below CLAIM_IDLE_MS, so a stuck
entry cannot hide behind a reclaim)."""
MAX_INPUT_BYTES = 65_536
GOOD = json.dumps([0.5] * 128)


@dataclass
class Live:
    """A service process and what the campaign needs to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    keys: KeySpace
    client: redis.Redis


def start_service(redis_url: str, prefix: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = service_env(
        redis_url,
        prefix,
        PORT=str(port),
        CONSUMER_NAME=CONSUMER,
        MAX_INPUT_BYTES=str(MAX_INPUT_BYTES),
        MODELS_CONFIG=str(ROOT / "weights" / "models.toml"),
        WEIGHTS_DIR=str(ROOT / "weights"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "bales_stream", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(process, port, timeout_s=120)
    return process, port


def ready(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def wait_ready(process: subprocess.Popen[bytes], port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ready(port)[0] != 200:
        assert process.poll() is None, f"the service exited with {process.returncode}"
        assert time.monotonic() < deadline, f"not ready: {ready(port)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def live(redis_server) -> Iterator[Live]:
    prefix = f"camp{uuid.uuid4().hex[:8]}"
    process, port = start_service(redis_server.url, prefix)
    client = redis.Redis.from_url(redis_server.url)
    running = Live(process, port, KeySpace(prefix), client)
    yield running
    running.process.send_signal(signal.SIGTERM)  # the restart test replaces the process
    assert running.process.wait(timeout=60) == 0
    client.close()


# ---- what a client can write ---------------------------------------------------------

text = st.text(max_size=40)
junk_bytes = st.binary(max_size=64)
non_utf8 = st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"abc\x80"])
huge = st.integers(MAX_INPUT_BYTES + 1, 3 * MAX_INPUT_BYTES).map(lambda n: b"9" * n)
generic = st.one_of(st.just(b""), text.map(str.encode), junk_bytes, non_utf8, huge)
"""What any field may hold: empty, any text, any bytes, non-UTF-8, huge."""

DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
TENSOR_NAMES = ["input", "input_ids", "attention_mask", "image", "token_type_ids", "x" * 70]


@st.composite
def safetensors_documents(draw: st.DrawFn) -> bytes:
    """A well-formed safetensors document of arbitrary named tensors (any dtype and shape,
    empty ones included), or one whose header lies about its length or its data."""
    tensors = {}
    for name in draw(st.lists(st.sampled_from(TENSOR_NAMES), max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(0, 140), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        value = draw(st.sampled_from([0, 1, 7, -1]))
        # an array even of shape [] (zeros + a number would be a numpy scalar there), and
        # -1 wraps for the unsigned and bool dtypes instead of overflowing
        tensors[name] = np.full(shape, value).astype(dtype)
    document = safetensors.numpy.save(tensors)
    lie = draw(st.sampled_from(["none", "none", "length", "data", "header"]))
    if lie == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + document[8:]
    if lie == "data":
        return document[: draw(st.integers(0, len(document)))]
    if lie == "header":
        header = draw(st.binary(max_size=80))
        return len(header).to_bytes(8, "little") + header + document[8:]
    return document


TYPED_INPUTS = st.one_of(
    safetensors_documents(),
    st.sampled_from(
        [
            json.dumps({"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}).encode(),
            json.dumps({"input_ids": [2, 999_999, 3], "attention_mask": [1, 1, 1]}).encode(),
            json.dumps({"input_ids": [-1], "attention_mask": [0]}).encode(),
            json.dumps({"input_ids": [2] * 129, "attention_mask": [1] * 129}).encode(),
            json.dumps({"image": [[256] * 8] * 8}).encode(),
            json.dumps({"image": [[1.5] * 8] * 8}).encode(),
            json.dumps({str(i): [i] for i in range(2000)}).encode(),
            "\u00e9\u202e \x00 \U0001f600".encode(),
            b" " * 60_000,
            b"x" * 60_000,
        ]
    ),
)

SPECIFIC: dict[bytes, st.SearchStrategy[bytes]] = {
    b"request_id": st.sampled_from(
        [b"h-\n", "h-\u00e9".encode(), b"x" * 129, b"a b", "٣".encode()]
    ),
    b"model_id": st.sampled_from(
        [b"nope", b"stub_v1 ", b"STUB_V1", b"stub_v2", b"text_embed_demo", b"digits_cnn"]
    ),
    b"input": st.one_of(
        st.sampled_from(
            [
                json.dumps([3e38] * 128).encode(),
                json.dumps([[0.5] * 128]).encode(),
                b"[NaN]",
                b"[1e400]",
                json.dumps([0.5] * 127 + ["a"]).encode(),
                json.dumps({"a": 1}).encode(),
                b"[" * 10_000,
            ]
        ),
        st.binary(min_size=512, max_size=512),  # f32-sized bytes (may hold NaN)
        st.lists(st.floats(width=32), min_size=128, max_size=128).map(
            lambda v: json.dumps(v).encode()
        ),
        TYPED_INPUTS,
    ),
    b"encoding": st.sampled_from([b"json", b"f32", b"F32", b"f16", b"safetensors", b"text"]),
    b"reply_encoding": st.sampled_from([b"json", b"safetensors", b"SAFETENSORS", b"msgpack"]),
    b"timeout_ms": st.one_of(
        st.integers(-5, 90_000_000).map(lambda n: str(n).encode()),
        st.sampled_from(["²", "٣٠٠٠", "1e3", " 5", "5 ", "0x10", "9" * 5000]).map(str.encode),
    ),
    b"model_type": st.sampled_from([b"classification", b"regression", b"\x00"]),
    b"traceparent": st.sampled_from([b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", b"ff-x"]),
    b"reply_to": st.just(b""),  # filled in by the test (needs the key space)
}
KINDS = ("string", "hash", "set", "zset", "list", "stream", "none")
BASES = [
    {b"model_id": b"stub_v1", b"input": GOOD.encode()},
    {b"model_id": b"text_cls_demo", b"encoding": b"text", b"input": b"streams and replies"},
    {
        b"model_id": b"text_embed_demo",
        b"encoding": b"safetensors",
        b"reply_encoding": b"safetensors",
        b"input": safetensors.numpy.save(
            {"input_ids": np.array([2, 40, 3]), "attention_mask": np.ones(3, np.int64)}
        ),
    },
    {b"model_id": b"digits_cnn", b"input": json.dumps({"image": [[9] * 8] * 8}).encode()},
]
"""Valid entries the campaign mutates: the stub, text, safetensors, a uint8 image."""


@st.composite
def entries(draw: st.DrawFn) -> dict:
    """A valid entry with one to three fields mutated (absent, or a specific or generic bad
    value), maybe unknown and duplicate fields; plus which type of key squats the reply key
    and the inbox, the priority, and whether its ID is set ahead of the clock."""
    fields = {b"request_id": f"h-{draw(st.uuids()).hex}".encode(), **draw(st.sampled_from(BASES))}
    for name in draw(st.lists(st.sampled_from(sorted(SPECIFIC)), max_size=3, unique=True)):
        choice = draw(st.sampled_from(["absent", "specific", "specific", "generic"]))
        if choice == "absent":
            fields.pop(name, None)
        else:
            fields[name] = draw(SPECIFIC[name] if choice == "specific" else generic)
    pairs = list(fields.items())
    pairs += draw(st.lists(st.tuples(junk_bytes, junk_bytes), max_size=2))  # unknown fields
    if pairs and draw(st.booleans()):
        pairs.append(draw(st.sampled_from(pairs)))  # a field given twice
    return {
        "pairs": pairs,
        "inbox": draw(st.sampled_from(["inbox", "outside", "junk"])),
        "reply_kind": draw(st.sampled_from(("none",) * 4 + KINDS)),
        "inbox_kind": draw(st.sampled_from(KINDS)),
        "priority": draw(st.integers(0, 2)),
        "id_ahead_ms": draw(st.sampled_from([None, None, 10, 3_600_000])),
    }


def squat(client: redis.Redis, key: str, kind: str) -> None:
    """Put a key of ``kind`` where the service will write."""
    writers = {
        "string": lambda: client.set(key, "x"),
        "hash": lambda: client.hset(key, "f", "v"),
        "set": lambda: client.sadd(key, "m"),
        "zset": lambda: client.zadd(key, {"m": 1}),
        "list": lambda: client.rpush(key, "earlier"),
        "stream": lambda: client.xadd(key, {"f": "v"}),
    }
    client.delete(key)  # an earlier example may have used the same name
    if kind in writers:
        writers[kind]()


def xadd_entry(live: Live, entry: dict) -> str | None:
    """XADD the entry as a plain client would; returns its request_id if it has one."""
    keys, client = live.keys, live.client
    request_id = next((v for k, v in entry["pairs"] if k == b"request_id"), None)
    name = request_id.decode("utf-8", "replace") if request_id else None
    if name is not None and len(name) <= 200:
        squat(client, keys.reply(name), entry["reply_kind"])
    inbox = {
        "inbox": keys.inbox(uuid.uuid4().hex),
        "outside": f"other:{uuid.uuid4().hex}",
        "junk": "\udcff",
    }[entry["inbox"]]
    if entry["inbox"] == "inbox":
        squat(client, inbox, entry["inbox_kind"])
    flat: list[bytes] = []
    for key, value in entry["pairs"]:
        if key == b"reply_to":
            value = inbox.encode("utf-8", "surrogateescape")
        flat += [key, value]
    if not flat:
        flat = [b"nothing", b""]
    entry_id = "*"
    if entry["id_ahead_ms"]:
        entry_id = f"{int(time.time() * 1000) + entry['id_ahead_ms']}-{uuid.uuid4().int % 1000}"
    try:
        client.execute_command("XADD", keys.stream(entry["priority"]), entry_id, *flat)
    except redis.ResponseError:  # Redis refused the ID (not after the stream's last): fine
        return None
    return name


def assert_serving(live: Live) -> None:
    """A canary is answered within the bound, nothing stays pending, /ready is 200."""
    canary = f"canary-{uuid.uuid4().hex}"
    live.client.xadd(
        live.keys.stream(2), {"request_id": canary, "model_id": "stub_v1", "input": GOOD}
    )
    popped = live.client.blpop([live.keys.reply(canary)], timeout=CANARY_BOUND_S)
    assert popped is not None, "the canary was not answered: the consumer is stuck"
    assert json.loads(popped[1])["status"] == "ok"
    deadline = time.monotonic() + SETTLED_BOUND_S
    while sum(live.client.xpending(s, "bales")["pending"] for s in live.keys.streams):
        assert time.monotonic() < deadline, "an entry stays pending"
        time.sleep(0.01)
    status, body = ready(live.port)
    assert status == 200, body
    assert live.process.poll() is None


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entry=entries())
def test_no_entry_stops_wedges_or_crashes_the_service(live: Live, entry: dict) -> None:
    name = xadd_entry(live, entry)
    assert_serving(live)
    if name is None or entry["reply_kind"] != "none":
        return
    if not wire.is_valid_request_id(name):
        return  # no usable request_id: dead-lettered (checked by pending == 0 above)
    document = live.client.lindex(live.keys.reply(name), 0)
    assert document is not None, f"request {name!r} was acked without a reply"
    reply = ClientCore.decode_reply(document)  # JSON, or safetensors when asked and ok
    assert reply["request_id"] == name
    if reply["status"] == "error":
        assert reply["error"]["code"] and reply["error"]["message"]
    else:
        assert reply["status"] == "ok" and 0 <= reply["queued_ms"] <= reply["latency_ms"]


POISON = [
    {"request_id": "poison-timeout", "model_id": "stub_v1", "input": GOOD, "timeout_ms": "²"},
    {"request_id": "poison-big", "model_id": "stub_v1", "input": "9" * (2 * MAX_INPUT_BYTES)},
    {"request_id": "poison-nan", "model_id": "stub_v1", "input": json.dumps([3e38] * 128)},
    {"request_id": "bad id!", "model_id": "stub_v1", "input": GOOD},
    {"model_id": "stub_v1", "input": GOOD},
    {"request_id": "poison-good", "model_id": "stub_v1", "input": GOOD, "timeout_ms": "600000"},
]


def test_a_restart_under_the_same_name_answers_poison_in_its_pending_list(
    live: Live, redis_server
) -> None:
    live.process.kill()  # as a node failure would
    live.process.wait(timeout=30)
    for fields in POISON:
        live.client.xadd(live.keys.stream(0), fields)  # type: ignore[arg-type]
    live.client.hset(live.keys.desired_models, mapping={"stub_v1": "junk", "x y": "{}"})
    taken = live.client.xreadgroup("bales", CONSUMER, {live.keys.stream(0): ">"}, count=100)
    assert len(taken[0][1]) == len(POISON)  # read by this consumer name, never answered
    live.process, live.port = start_service(redis_server.url, live.keys.prefix)
    assert_serving(live)
    codes = {}
    for name in ("poison-timeout", "poison-big", "poison-nan", "poison-good"):
        reply = json.loads(live.client.lindex(live.keys.reply(name), 0))
        codes[name] = reply["error"]["code"] if reply["status"] == "error" else "ok"
    assert codes == {
        "poison-timeout": "invalid_request",
        "poison-big": "invalid_request",
        "poison-nan": "invalid_output",
        "poison-good": "ok",
    }
    assert live.client.xlen(live.keys.dead_letter) >= 2  # the two without a usable request_id
