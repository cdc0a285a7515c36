"""A local Redis Cluster of redis-server children, for the tests and the benchmarks (not
part of the service: ``bales_stream.embedded_redis`` holds the single server the service may
start)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from bales_stream.embedded_redis import RedisServer, free_port

CLUSTER_BUS_OFFSET = 10_000
"""A cluster node also listens on port + 10000 (the cluster bus)."""


def free_cluster_port() -> int:
    """A free port whose cluster bus port is free too (and below 65536)."""
    for _ in range(100):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and _can_bind(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("found no free port pair for a cluster node")


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """A Redis Cluster of redis-server children on 127.0.0.1, for tests and benchmarks:
    ``primaries`` primaries with ``replicas`` replicas each, joined by
    ``redis-cli --cluster create``."""

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """A startup node's URL (cluster clients discover the others)."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 60) -> LocalCluster:
        """Start the nodes, create the cluster, and wait until every node says it is ok."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (it comes with redis-server)")
        options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        options += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(RedisServer(None, free_cluster_port(), *options).start())
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            replicas = ["--cluster-replicas", str(self.replicas)]
            created = subprocess.run(
                [cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
            self._wait_until_ok(cli, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ok(self, cli: str, timeout_s: float) -> None:
        """Every node says the cluster is ok, and every replica's link to its primary is up
        (clients only see replicas once they replicate)."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            while not self._node_ready(cli, node.port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} did not become ready")
                time.sleep(0.05)  # a child's state: there is no event to wait on

    def _node_ready(self, cli: str, port: int) -> bool:
        def ask(*command: str) -> str:
            return subprocess.run(
                [cli, "-p", str(port), *command], capture_output=True, text=True
            ).stdout

        if "cluster_state:ok" not in ask("cluster", "info"):
            return False
        replication = ask("info", "replication")
        if "role:slave" in replication:
            return "master_link_status:up" in replication
        return f"connected_slaves:{self.replicas}" in replication

    def stop(self) -> None:
        """Stop every node and remove their data."""
        for node in self.nodes:
            node.stop()
        self.nodes = []
