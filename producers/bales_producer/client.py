"""The synchronous producer client: a thin shell over ``ClientCore`` and redis-py."""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from . import wire
from .core import (
    DEFAULT_TIMEOUT_S,
    REPLY_GRACE_S,
    ClientCore,
    OutgoingRequest,
    backlog_from_replies,
)
from .errors import RequestTimeout


class Client:
    """Send inference requests to bales-stream and wait for their replies.

    >>> client = Client("redis://localhost:6379/0")
    >>> reply = client.infer("stub_v1", [0.0] * 128)
    >>> reply["result"]["label"]
    """

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379/0",
        *,
        prefix: str = wire.DEFAULT_PREFIX,
        queue: str = wire.DEFAULT_QUEUE,
        priority_levels: int = wire.DEFAULT_PRIORITY_LEVELS,
        group: str = "bales",
        max_backlog: int | None = None,
        redis_client: redis.Redis | None = None,
        cluster: bool = False,
        shards: int | None = None,
    ) -> None:
        """``max_backlog``: refuse to enqueue (``Overloaded``) while the target priority has
        more than this many requests not yet delivered to the consumer group ``group``.
        ``cluster`` (or a ``redis+cluster://`` URL): ``redis_url`` names one node of a Redis
        Cluster. ``shards``: the fleet's ``SHARDS``; None reads what the consumers published
        (once, before the first send)."""
        keys = wire.KeySpace(prefix, queue, priority_levels)
        self.core = ClientCore(keys, group=group, max_backlog=max_backlog, shards=shards)
        # socket_timeout=None: blocking reads carry their own timeout, and redis-py's 5 s
        # default would cut a long BLPOP short.
        redis_class = RedisCluster if cluster or wire.is_cluster_url(redis_url) else redis.Redis
        url = wire.plain_url(redis_url)
        self.redis = redis_client or redis_class.from_url(url, socket_timeout=None)

    def submit(self, model_id: str, values: Any = None, **options: Any) -> str:
        """Enqueue one request and return its request_id.

        ``values``: a list, a numpy array, or a dict of named arrays (numpy arrays go as a
        safetensors document, keeping their dtypes). Options: ``text`` (instead of values,
        for a model with a tokenizer), ``reply_encoding`` (``"safetensors"``: arrays in the
        reply come back as numpy arrays), ``priority`` (0 is highest, default 1),
        ``timeout_s`` (default 5), ``request_id``, ``model_type``, ``traceparent`` (W3C
        trace context).
        """
        return self._enqueue(model_id, values, options).request_id

    def result(
        self, request_id: str, timeout_s: float = DEFAULT_TIMEOUT_S + REPLY_GRACE_S
    ) -> dict[str, Any]:
        """Wait for a request's reply and return it (consumes the reply key).

        Raises ``ReplyError`` (typed by code) for an error reply and ``RequestTimeout``
        when nothing arrives within ``timeout_s``.
        """
        popped = self.redis.blpop([self.core.reply_key(request_id)], timeout=timeout_s)
        if popped is None:
            raise RequestTimeout(f"no reply for request {request_id} within {timeout_s} s")
        return self.core.check(self.core.decode_reply(popped[1]))  # type: ignore[index]

    def poll(self, request_id: str) -> dict[str, Any] | None:
        """Return the reply if it is there, else None (does not consume it)."""
        raw = self.redis.lindex(self.core.reply_key(request_id), 0)
        if raw is None:
            return None
        return self.core.check(self.core.decode_reply(raw))  # type: ignore[arg-type]

    def infer(self, model_id: str, values: Any = None, **options: Any) -> dict[str, Any]:
        """Submit one request and wait for its reply (see ``submit`` for the options)."""
        request = self._enqueue(model_id, values, options)
        return self.result(request.request_id, request.wait_s)

    def _enqueue(self, model_id: str, values: Any, options: dict[str, Any]) -> OutgoingRequest:
        if not self.core.shards_known:
            self.core.use_published_shards(self.redis.get(self.core.keys.shard_count))  # type: ignore[arg-type]
        request = self.core.build(model_id, values, **options)
        gate = self.core.gate
        if gate.stale(request.stream):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xlen(request.stream)
            pipe.xinfo_groups(request.stream)
            length, groups = pipe.execute(raise_on_error=False)
            gate.record(request.stream, backlog_from_replies(length, groups, self.core.group))
        gate.check(request.stream, request.priority)
        self.redis.xadd(request.stream, request.fields)  # type: ignore[arg-type]
        return request

    def close(self) -> None:
        """Close the connection pool."""
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
