"""The floor: the cheapest honest Python consumer of the bales-stream wire format v1.

It is what bales-stream's per-request cost is measured against (``benchmarks.vs_floor``):
the least work a Python process can do and still answer real requests that the
``bales_producer`` clients decode. One loop, per batch:

1. one ``XREADGROUP`` (``COUNT`` entries per stream, ``BLOCK``) on ``<prefix>:{requests}:p0..p2``
   (the reply lists the streams highest priority first, and the batch is answered in that
   order);
2. the inputs (``encoding=f32`` bytes, or a JSON array via orjson) stacked as float32
   ``(n, 128)`` and multiplied by a fixed ``(128, 10)`` weight: the model's stand-in, its
   argmax the label and its softmax maximum the confidence;
3. one reply document per request, of the service's shape, serialised by orjson;
4. one pipelined round trip holding one Lua call that RPUSHes (and EXPIREs) every reply, to
   ``<prefix>:reply:<request_id>`` and to ``reply_to`` when given, and one Lua call that
   acks every entry of the batch.

Everything the service does beyond that is left out on purpose: no validation (a malformed
entry can break the batch), no fencing (a reply is pushed even if the key holds one), no
deadlines, no reclaiming of other consumers' entries, no metrics, no sidecar. ``queued_ms``
and ``latency_ms`` count from the entry ID on this machine's clock, which is Redis's clock
when both run on one host.

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.floor --redis-url
redis://127.0.0.1:6390/0 --prefix bales`` (until SIGTERM). One BLAS thread, as bales-stream
runs torch with one: the matmul is too small to gain from more, and idle BLAS threads spin
(they burn CPU the table would charge to the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

GROUP = "bales"
MODEL_VERSION = "floor-matmul"
INPUT_SIZE = 128
LABELS = 10
REPLY_TTL_S = 60
WEIGHT = np.random.default_rng(0).standard_normal((INPUT_SIZE, LABELS)).astype(np.float32)

REPLY_LUA = """
-- KEYS: n reply keys, then the inbox keys. ARGV: ttl, n, n documents, then for each inbox
-- key the index (1-based) of its document.
local ttl, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  redis.call('RPUSH', KEYS[i], ARGV[2 + i])
  redis.call('EXPIRE', KEYS[i], ttl)
end
for j = n + 1, #KEYS do
  redis.call('RPUSH', KEYS[j], ARGV[2 + tonumber(ARGV[2 + j])])
  redis.call('EXPIRE', KEYS[j], ttl)
end
return n
"""

ACK_LUA = """
-- KEYS: streams. ARGV: group, then per stream the number of its ids followed by the ids.
local group, at = ARGV[1], 2
for i = 1, #KEYS do
  local count = tonumber(ARGV[at])
  redis.call('XACK', KEYS[i], group, unpack(ARGV, at + 1, at + count))
  at = at + count + 1
end
return 0
"""


def streams(prefix: str, levels: int = 3) -> list[str]:
    """The request streams, highest priority first."""
    return [f"{prefix}:{{requests}}:p{level}" for level in range(levels)]


async def create_group(redis: aioredis.Redis, names: list[str]) -> None:
    """The consumer group on every stream, from its start, creating the stream if needed."""
    for name in names:
        try:
            await redis.xgroup_create(name, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def stack_inputs(fields: list[dict[bytes, bytes]]) -> np.ndarray:
    """The batch's inputs as one float32 ``(n, 128)`` array (f32 bytes, else a JSON array)."""
    parts = [
        f[b"input"]
        if f.get(b"encoding") == b"f32"
        else np.asarray(orjson.loads(f[b"input"]), dtype="<f4").tobytes()
        for f in fields
    ]
    return np.frombuffer(b"".join(parts), dtype="<f4").reshape(len(parts), INPUT_SIZE)


def infer(inputs: np.ndarray) -> tuple[list[int], list[float]]:
    """The model's stand-in: labels and softmax confidences of ``inputs @ WEIGHT``."""
    logits = inputs @ WEIGHT
    top = logits.max(axis=1, keepdims=True)
    confidence = 1.0 / np.exp(logits - top).sum(axis=1)
    return logits.argmax(axis=1).tolist(), confidence.tolist()


def build_documents(
    batch: list[tuple[int, bytes, dict[bytes, bytes]]],
    labels: list[int],
    confidences: list[float],
    read_ms: float,
) -> list[bytes]:
    """One reply document per request, in the service's shape."""
    now_ms = time.time() * 1000
    size = len(batch)
    documents = []
    for (priority, entry_id, f), label, confidence in zip(batch, labels, confidences, strict=True):
        enqueued_ms = int(entry_id[: entry_id.index(b"-")])
        documents.append(
            orjson.dumps(
                {
                    "request_id": f[b"request_id"].decode(),
                    "model_id": f[b"model_id"].decode(),
                    "model_version": MODEL_VERSION,
                    "status": "ok",
                    "result": {"label": label, "confidence": confidence},
                    "batch_size": size,
                    "queued_ms": round(max(0.0, read_ms - enqueued_ms), 3),
                    "latency_ms": round(max(0.0, now_ms - enqueued_ms), 3),
                    "priority": priority,
                }
            )
        )
    return documents


def reply_call(
    prefix: str, batch: list[tuple[int, bytes, dict[bytes, bytes]]], documents: list[bytes]
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of ``REPLY_LUA`` for one batch."""
    keys: list[Any] = [prefix.encode() + b":reply:" + f[b"request_id"] for _, _, f in batch]
    inboxes: list[Any] = []
    indexes: list[Any] = []
    for i, (_, _, f) in enumerate(batch, start=1):
        reply_to = f.get(b"reply_to")
        if reply_to:
            inboxes.append(reply_to)
            indexes.append(i)
    return keys + inboxes, [REPLY_TTL_S, len(keys), *documents, *indexes]


def ack_call(
    names: list[str], batch: list[tuple[int, bytes, dict[bytes, bytes]]]
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of ``ACK_LUA`` for one batch."""
    by_level: dict[int, list[bytes]] = {}
    for priority, entry_id, _ in batch:
        by_level.setdefault(priority, []).append(entry_id)
    keys: list[Any] = []
    argv: list[Any] = [GROUP]
    for priority, ids in by_level.items():
        keys.append(names[priority])
        argv += [len(ids), *ids]
    return keys, argv


async def serve(
    redis: aioredis.Redis, prefix: str, consumer: str, count: int, block_ms: int
) -> None:
    """Read, compute, answer and ack batches until SIGTERM (the batch in hand is finished)."""
    names = streams(prefix)
    level_of = {name.encode(): level for level, name in enumerate(names)}
    await create_group(redis, names)
    reply_sha = await redis.script_load(REPLY_LUA)
    ack_sha = await redis.script_load(ACK_LUA)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    while not stopping.is_set():
        response = await redis.xreadgroup(
            GROUP, consumer, dict.fromkeys(names, ">"), count=count, block=block_ms
        )
        if not response:
            continue
        read_ms = time.time() * 1000
        batch = [
            (level_of[stream], entry_id, f)
            for stream, entries in response
            for entry_id, f in entries
        ]
        labels, confidences = infer(stack_inputs([f for _, _, f in batch]))
        documents = build_documents(batch, labels, confidences, read_ms)
        async with redis.pipeline(transaction=False) as pipe:
            keys, argv = reply_call(prefix, batch, documents)
            pipe.evalsha(reply_sha, len(keys), *keys, *argv)
            keys, argv = ack_call(names, batch)
            pipe.evalsha(ack_sha, len(keys), *keys, *argv)
            await pipe.execute()


async def main_async(args: argparse.Namespace) -> None:
    """Connect (hiredis parses replies when installed; the connection is named after the
    consumer) and serve until SIGTERM."""
    redis = aioredis.Redis.from_url(
        args.redis_url, socket_timeout=None, client_name=args.consumer_name
    )
    try:
        await serve(redis, args.prefix, args.consumer_name, args.count, args.block_ms)
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default="bales", help="KEY_PREFIX (default bales)")
    parser.add_argument("--consumer-name", default="floor")
    parser.add_argument("--count", type=int, default=256, help="XREADGROUP COUNT per stream")
    parser.add_argument("--block-ms", type=int, default=500, help="XREADGROUP BLOCK")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
