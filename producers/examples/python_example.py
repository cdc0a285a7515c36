"""Send requests with the bales-stream producer library (sync and async).

python producers/examples/python_example.py            # REDIS_URL or redis://localhost:6379/0
"""

from __future__ import annotations

import asyncio
import os
import random

from bales_producer import AsyncClient, Client, ReplyError

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
PREFIX = os.environ.get("BALES_PREFIX", "bales")


def sync_example() -> None:
    with Client(REDIS_URL, prefix=PREFIX) as client:
        reply = client.infer("stub_v1", [random.uniform(-1, 1) for _ in range(128)], priority=0)
        print("sync:", reply["result"], reply["model_version"], f"{reply['latency_ms']} ms")
        try:
            client.infer("stub_v1", [1.0, 2.0])
        except ReplyError as exc:  # a typed error: InvalidRequest here
            print("sync error:", type(exc).__name__, exc.message)


async def async_example(count: int = 1000) -> None:
    async with AsyncClient(REDIS_URL, prefix=PREFIX) as client:
        inputs = [[random.uniform(-1, 1) for _ in range(128)] for _ in range(count)]
        replies = await asyncio.gather(*(client.infer("stub_v1", x) for x in inputs))
        sizes = [r["batch_size"] for r in replies]
        print(f"async: {len(replies)} replies, mean batch size {sum(sizes) / len(sizes):.1f}")


if __name__ == "__main__":
    sync_example()
    asyncio.run(async_example())
