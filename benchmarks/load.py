"""Full-stack load through Redis: producer -> streams -> consumers -> reply keys.

Starts its own redis-server (or uses ``--redis-url``) and ``--consumers`` consumer processes
(``python consumer.py``), then drives them with the ``AsyncClient`` from this process:

* ``--mode saturate``: ``--in-flight`` requests outstanding at all times, for ``--duration-s``;
* ``--mode open``: a fixed ``--rate`` (req/s); latency counts from each request's INTENDED send
  time, so a stalled producer or queue cannot hide its delay (no coordinated omission).

Prints throughput, p50/p90/p99/p99.9 per priority, average batch size, errors, and CPU
seconds per request of the producer, the consumers and redis-server.
Run: ``python -m benchmarks.load --mode saturate --consumers 2 --payload f32``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from bales_producer import AsyncClient, BalesError
from prometheus_client.parser import text_string_to_metric_families

from bales_stream.embedded_redis import RedisServer, free_port

from .fault_harness import wait_ready
from .faults import cpu_seconds
from .local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Results:
    latencies_ms: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: [], 2: []})
    batch_sizes: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, priority: int, latency_ms: float, reply: dict) -> None:
        self.latencies_ms[priority].append(latency_ms)
        self.batch_sizes.append(reply["batch_size"])

    def fail(self, exc: BaseException) -> None:
        name = getattr(exc, "code", None) or type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99, 99.9)}


class Consumers:
    """N consumer processes, each with its own sidecar port."""

    def __init__(self, count: int, redis_url: str, prefix: str, env: dict[str, str]) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "LOG_LEVEL": "warning",
            **env,
        }
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for port in self.ports:
            self.processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "consumer.py", cwd=ROOT, env={**self.env, "PORT": str(port)}
                )
            )
        for port in self.ports:
            await wait_ready(port)

    def cpu_s(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes)

    async def stages(self) -> dict[str, dict[str, float]]:
        """p50 and p99 (ms) of each ``bales_stage_seconds`` stage, over every consumer."""
        buckets: dict[str, dict[float, float]] = {}
        async with aiohttp.ClientSession() as session:
            for port in self.ports:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                for family in text_string_to_metric_families(text):
                    if family.name != "bales_stage_seconds":
                        continue
                    for sample in family.samples:
                        if sample.name.endswith("_bucket"):
                            stage = buckets.setdefault(sample.labels["stage"], {})
                            bound = float(sample.labels["le"])
                            stage[bound] = stage.get(bound, 0.0) + sample.value
        return {
            name: {"p50": histogram_quantile(0.5, b), "p99": histogram_quantile(0.99, b)}
            for name, b in buckets.items()
        }

    async def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            await process.wait()


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """The ``q`` quantile (ms) of cumulative histogram buckets (upper bound s -> count), by
    linear interpolation within the bucket, as Prometheus's ``histogram_quantile``."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if not total:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)) * 1000
        lower, below = bound, count
    return lower * 1000


async def show_progress(results: Results, duration_s: float, interval_s: float = 1.0) -> None:
    """Print a progress line to stderr every ``interval_s`` until cancelled."""
    started_s, last = time.perf_counter(), 0
    while True:
        await asyncio.sleep(interval_s)
        elapsed_s = time.perf_counter() - started_s
        done = results.count
        print(
            f"  [{elapsed_s:5.1f}/{duration_s:.0f} s] {done:,} answered, "
            f"{(done - last) / interval_s:,.0f} req/s now, "
            f"{sum(results.errors.values())} errors",
            file=sys.stderr,
            flush=True,
        )
        last = done


def make_inputs(count: int, payload: str) -> list:
    array = np.random.default_rng(0).standard_normal((count, 128)).astype(np.float32)
    return list(array) if payload == "f32" else array.tolist()


def pick_priority(mix: list[float]) -> int:
    return random.choices(range(len(mix)), weights=mix)[0]


async def send_one(
    client: AsyncClient, values: object, args: argparse.Namespace, results: Results, since_s: float
) -> None:
    """One request; its latency counts from ``since_s`` (its intended send time)."""
    priority = pick_priority(args.mix)
    try:
        reply = await client.infer("stub_v1", values, priority=priority, timeout_s=args.timeout_s)
        results.record(priority, (time.perf_counter() - since_s) * 1000, reply)
    except BalesError as exc:
        results.fail(exc)


async def saturate(client: AsyncClient, args: argparse.Namespace, results: Results) -> None:
    inputs = make_inputs(1024, args.payload)
    deadline_s = time.perf_counter() + args.duration_s

    async def lane(lane_id: int) -> None:
        i = lane_id
        while time.perf_counter() < deadline_s:
            await send_one(client, inputs[i % len(inputs)], args, results, time.perf_counter())
            i += args.in_flight

    await asyncio.gather(*(lane(i) for i in range(args.in_flight)))


async def open_loop(client: AsyncClient, args: argparse.Namespace, results: Results) -> None:
    inputs = make_inputs(1024, args.payload)
    total = int(args.rate * args.duration_s)
    start_s = time.perf_counter() + max(0.05, getattr(args, "start_at", 0) - time.time())
    tasks = []

    i = 0
    while i < total:
        now_s = time.perf_counter()
        while i < total and start_s + i / args.rate <= now_s:
            intended_s = start_s + i / args.rate
            values = inputs[i % len(inputs)]
            tasks.append(asyncio.create_task(send_one(client, values, args, results, intended_s)))
            i += 1
        await asyncio.sleep(max(0.0, start_s + i / args.rate - time.perf_counter()))
    await asyncio.gather(*tasks)


CpuSample = tuple[float, float, float]
"""CPU seconds so far of (the producer(s), the consumers, redis-server)."""


@dataclass
class System:
    """What the load runs against: a Redis, a key prefix, and the processes to meter."""

    redis_url: str
    prefix: str
    consumers: Consumers
    server_pids: list[int]
    cluster: bool = False

    def cpu(self, producer_s: float) -> CpuSample:
        """CPU seconds so far of (producer_s, the consumers, the redis-server(s))."""
        server_s = sum(cpu_seconds(pid) for pid in self.server_pids)
        return (producer_s, self.consumers.cpu_s(), server_s)


async def run_here(
    args: argparse.Namespace, system: System, results: Results
) -> tuple[CpuSample, CpuSample, float]:
    """Drive the load from this process."""
    async with AsyncClient(
        system.redis_url, prefix=system.prefix, cluster=system.cluster, shards=args.shards
    ) as client:
        await client.infer("stub_v1", make_inputs(1, args.payload)[0])  # warm-up
        cpu_before = system.cpu(time.process_time())
        started_s = time.perf_counter()
        progress = asyncio.create_task(show_progress(results, args.duration_s))
        try:
            await (saturate if args.mode == "saturate" else open_loop)(client, args, results)
        finally:
            progress.cancel()
        elapsed_s = time.perf_counter() - started_s
        cpu_after = system.cpu(time.process_time())
    return cpu_before, cpu_after, elapsed_s


async def run_producers(
    args: argparse.Namespace, system: System, results: Results
) -> tuple[CpuSample, CpuSample, float]:
    """Drive the load from ``--producers`` processes, each offering ``rate / N`` (open mode)
    or ``in_flight / N`` (saturate), all starting at the same moment; merge their results."""
    start_at = time.time() + PRODUCER_START_DELAY_S
    outputs = [Path(f"/tmp/bales-load-{uuid.uuid4().hex}.json") for _ in range(args.producers)]
    share = [
        f"--rate={args.rate / args.producers}",
        f"--in-flight={max(1, args.in_flight // args.producers)}",
    ]
    command = [sys.executable, "-m", "benchmarks.load", "--role=producer", *share]
    command += [f"--{name.replace('_', '-')}={value}" for name, value in _shared_options(args)]
    command += [f"--redis-url={system.redis_url}", f"--prefix={system.prefix}"]
    command += [f"--start-at={start_at}"]
    cpu_before = system.cpu(0.0)
    children = [
        await asyncio.create_subprocess_exec(*command, f"--producer-out={out}", cwd=ROOT)
        for out in outputs
    ]
    codes = [await child.wait() for child in children]
    ended_at = start_at
    if any(codes):
        raise RuntimeError(f"a producer process failed (exit codes {codes})")
    producer_cpu_s = 0.0
    for out in outputs:
        part = json.loads(out.read_text())
        out.unlink()
        for priority, values in part["latencies_ms"].items():
            results.latencies_ms[int(priority)] += values
        results.batch_sizes += part["batch_sizes"]
        for name, n in part["errors"].items():
            results.errors[name] = results.errors.get(name, 0) + n
        producer_cpu_s += part["cpu_s"]
        ended_at = max(ended_at, part["ended_at"])
    cpu_after = system.cpu(producer_cpu_s)
    return cpu_before, cpu_after, ended_at - start_at


PRODUCER_START_DELAY_S = 3.0
"""Time for the producer processes to start (imports, connections) before the clock runs."""


def _shared_options(args: argparse.Namespace) -> list[tuple[str, object]]:
    mix = ",".join(str(x) for x in args.mix)
    return [
        ("mode", args.mode),
        ("duration_s", args.duration_s),
        ("payload", args.payload),
        ("mix", mix),
        ("timeout_s", args.timeout_s),
        ("cluster", args.cluster),
        ("shards", args.shards),
    ]


async def producer_role(args: argparse.Namespace) -> None:
    """One of several producer processes: load the given share, write the raw results."""
    results = Results()
    client = AsyncClient(
        args.redis_url, prefix=args.prefix, cluster=args.cluster > 0, shards=args.shards
    )
    async with client:
        await client.infer("stub_v1", make_inputs(1, args.payload)[0])  # warm-up
        if args.mode == "saturate":
            await asyncio.sleep(max(0.0, args.start_at - time.time()))
        cpu_before = time.process_time()
        await (saturate if args.mode == "saturate" else open_loop)(client, args, results)
        cpu_s = time.process_time() - cpu_before
    args.producer_out.write_text(
        json.dumps(
            {
                "latencies_ms": results.latencies_ms,
                "batch_sizes": results.batch_sizes,
                "errors": results.errors,
                "cpu_s": cpu_s,
                "ended_at": time.time(),
            }
        )
    )


async def run(args: argparse.Namespace) -> dict:
    servers = start_redis(args)
    redis_url = args.redis_url or servers[0].url
    prefix = args.prefix or f"bench{uuid.uuid4().hex[:8]}"
    env = {
        "MAX_BATCH_SIZE": str(args.max_batch),
        "BATCH_WINDOW_MS": str(args.window_ms),
        "SHARDS": str(args.shards),
    }
    if args.cluster:
        env["REDIS_CLUSTER"] = "true"
    consumers = Consumers(args.consumers, redis_url, prefix, env)
    await consumers.start()
    results = Results()
    server_pids = [s.process.pid for s in servers if s.process]
    system = System(redis_url, prefix, consumers, server_pids, cluster=args.cluster > 0)
    try:
        drive = run_producers if args.producers > 1 else run_here
        cpu_before, cpu_after, elapsed_s = await drive(args, system, results)
        stages = await consumers.stages()
    finally:
        await consumers.stop()
        for server in servers:
            server.stop()
    done = max(results.count, 1)
    cpu_us = [
        (after - before) / done * 1e6 for before, after in zip(cpu_before, cpu_after, strict=True)
    ]
    return {
        "mode": args.mode,
        "payload": args.payload,
        "consumers": args.consumers,
        "producers": args.producers,
        "cluster_primaries": args.cluster,
        "shards": args.shards,
        "rate": args.rate if args.mode == "open" else None,
        "requests": results.count,
        "elapsed_s": elapsed_s,
        "throughput": results.count / elapsed_s,
        "latency_ms": {f"p{p}": percentiles(v) for p, v in results.latencies_ms.items() if v},
        "latency_ms_all": percentiles([x for v in results.latencies_ms.values() for x in v]),
        "avg_batch": float(np.mean(results.batch_sizes)) if results.batch_sizes else 0.0,
        "latency_curve_ms": {
            str(p): latency_curve(v) for p, v in results.latencies_ms.items() if v
        },
        "errors": results.errors,
        "stages_ms": stages,
        "cpu_us_per_request": {
            "producer": cpu_us[0],
            "consumers": cpu_us[1],
            "redis": cpu_us[2] if servers else None,
        },
    }


PLOT_PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100)


def latency_curve(values: list[float]) -> list[tuple[float, float]]:
    """(percentile, latency ms) points for the plot, from the fastest to the slowest."""
    array = np.asarray(values)
    return [(q, float(np.percentile(array, q))) for q in PLOT_PERCENTILES]


def write_plot(result: dict, path: Path) -> bool:
    """Latency by percentile per priority, as a PNG (False without matplotlib: the
    ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for priority, curve in result["latency_curve_ms"].items():
        # x: "nines" (1 / (1 - q)), so the tail gets the room it deserves
        xs = [1 / (1 - q / 100) if q < 100 else 1e5 for q, _ in curve]
        axes.plot(xs, [ms for _, ms in curve], marker="o", label=f"p{priority}")
    axes.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    axes.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    axes.set_xlabel("percentile")
    axes.set_ylabel("latency (ms)")
    title = f"{result['mode']} {result['payload']}, {result['consumers']} consumer(s)"
    if result["rate"]:
        title += f", {result['rate']:,.0f} req/s offered"
    axes.set_title(f"bales-stream latency: {title}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def print_report(result: dict) -> None:
    print(
        f"=== load: {result['mode']} {result['payload']}, {result['consumers']} consumer(s)"
        + (f", {result['rate']:,} req/s offered" if result["rate"] else "")
        + " ==="
    )
    print(
        f"requests {result['requests']:,} in {result['elapsed_s']:.2f} s = "
        f"{result['throughput']:,.0f} req/s; avg batch {result['avg_batch']:.1f}; "
        f"errors {sum(result['errors'].values())} {result['errors'] or ''}"
    )
    for name, stats in [("all", result["latency_ms_all"]), *result["latency_ms"].items()]:
        cells = "  ".join(f"{k} {v:7.2f}" for k, v in stats.items())
        print(f"  latency ms {name:<4} {cells}")
    cpu = result["cpu_us_per_request"]
    print("  CPU us/request: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v is not None))
    print("  where the time goes (bales_stage_seconds, ms; the whole run, warm-up included):")
    for name, stats in result["stages_ms"].items():
        print(f"    {name:<15} p50 {stats['p50']:8.2f}  p99 {stats['p99']:8.2f}")


def start_redis(args: argparse.Namespace) -> list[RedisServer]:
    """The redis-server(s) to run against, unless ``--redis-url`` names one: a single node,
    or with ``--cluster N`` a Redis Cluster of N primaries."""
    if args.redis_url:
        return []
    if args.cluster:
        return LocalCluster(primaries=args.cluster).start().nodes
    return [RedisServer().start()]


def build_parser() -> argparse.ArgumentParser:
    """The options of one load run (also used by ``benchmarks.scaling``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["saturate", "open"], default="saturate")
    parser.add_argument("--rate", type=float, default=2000, help="open mode: req/s offered")
    parser.add_argument("--duration-s", type=float, default=10)
    parser.add_argument("--payload", choices=["json", "f32"], default="f32")
    parser.add_argument("--consumers", type=int, default=1, help="0: use running consumers")
    parser.add_argument("--in-flight", type=int, default=1000, help="saturate mode")
    parser.add_argument(
        "--producers",
        type=int,
        default=1,
        help="producer processes sharing the load (one Python process tops out near 10k req/s)",
    )
    parser.add_argument(
        "--role", choices=["main", "producer"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--producer-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mix",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.1, 0.6, 0.3],
        help="share of p0,p1,p2 (default 0.1,0.6,0.3)",
    )
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=30)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="start a Redis Cluster of N primaries instead of one redis-server (REDIS_CLUSTER)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="SHARDS: stream sets per priority, each on its own hash tag (default 1)",
    )
    parser.add_argument(
        "--prefix",
        help="key prefix (default: a fresh one); with --consumers 0,"
        " drive an external service started with this KEY_PREFIX",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "load",
        help="write the result to OUT.json and the latency plot to OUT.png"
        " (default benchmarks/results/load)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.role == "producer":
        asyncio.run(producer_role(args))
        return
    result = asyncio.run(run(args))
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=2))
    print(f"  result: {json_path}")
    if write_plot(result, plot_path):
        print(f"  latency plot: {plot_path}")
    else:
        print("  no latency plot: matplotlib missing (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
