"""The peer of ``benchmarks.peers``: the same stub model behind a taskiq-redis worker, run
once per task, the way a user would serve it with a general task queue.

The worker (``taskiq worker benchmarks.peer_taskiq:broker``) and the producer both import
this module; ``PEER_REDIS_URL`` and ``PEER_QUEUE`` (set by ``benchmarks.peers``) say where.
Results use taskiq's JSON serializer (its default would be pickle).
"""

from __future__ import annotations

import os
from typing import Any

from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from . import peer_lanes

REDIS_URL = os.environ["PEER_REDIS_URL"]
QUEUE = os.environ.get("PEER_QUEUE", "bench-peer-taskiq")

broker = RedisStreamBroker(url=REDIS_URL, queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(
        REDIS_URL,
        serializer=JSONSerializer(),
        keep_results=False,
        result_ex_time=600,
        prefix_str=QUEUE,
    )
)


@broker.task(task_name="infer")
def infer(values: list[float]) -> dict[str, Any]:
    """One request, one model call (taskiq runs sync tasks in its thread pool)."""
    return peer_lanes.predict(values)
