"""Plain per-primary clients beside redis-py's cluster client, for the hot path only.

Completion writes one reply per request, each in its own hash slot. Through redis-py's
cluster pipeline that costs about 21 µs of client CPU per reply (slot lookup and bookkeeping
per command; 7.9 µs through a plain pipeline to one node, measured with 32 EVALSHA per
pipeline on a local 3-primary cluster). So on a cluster the replies are grouped by the
primary that owns their slot (the cluster client's slot map) and sent to it over its own
plain connection, as one script call per primary (``streams._REPLIES_ON_NODE_LUA``).
Anything unusual (a slot moved, a primary died, a script missing on a new primary) makes the
caller fall back to the cluster client, which follows redirects and refreshes its map; the
fast path then starts afresh.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis


class NodeClients:
    """A plain client per cluster primary, created on first use from the cluster client's
    own connection settings (address, credentials, TLS)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self._clients: dict[str, aioredis.Redis] = {}
        self._scripts: dict[str, set[str]] = defaultdict(set)

    def group_by_node(self, keys: Iterable[str]) -> dict[str, list[int]]:
        """Node name -> indexes of the keys whose slot that primary serves."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, key in enumerate(keys):
            groups[self.cluster.get_node_from_key(key).name].append(index)
        return groups

    async def client(self, node_name: str, scripts: Iterable[str] = ()) -> aioredis.Redis:
        """The plain client of one primary, with ``scripts`` loaded on it."""
        client = self._clients.get(node_name)
        if client is None:
            node = self.cluster.get_node(node_name=node_name)
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class, **node.connection_kwargs
            )
            client = self._clients[node_name] = aioredis.Redis(connection_pool=pool)
        loaded = self._scripts[node_name]
        for script in scripts:
            if script not in loaded:
                await client.script_load(script)
                loaded.add(script)
        return client

    async def reset(self) -> None:
        """Forget every client (after a fault: the topology may have changed)."""
        clients, self._clients = self._clients, {}
        self._scripts.clear()
        for client in clients.values():
            await client.aclose()
