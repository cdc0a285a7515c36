"""bales-stream against the floor: the cheapest honest consumer of the same wire format.

``benchmarks.floor`` is the least a Python process can do and still answer real requests:
one XREADGROUP of hundreds of entries, a numpy matmul, orjson replies, one Lua call for the
replies and one for the acks. This benchmark runs it and bales-stream ALTERNATELY (the order
flips every round) on one private redis-server, ``--consumers`` processes of each, so the
ratio says what everything bales-stream does beyond that costs: validation, fencing,
deadlines, priorities with shares, leases, metrics, the sidecar, and its model. The model
is NOT the same: bales-stream serves its ``stub_v1`` MLP through torch, the floor one
``(128, 10)`` matmul, so the ratio is an upper bound on the service's overhead.

The load is as cheap as it can be, so it does not decide the result:

* requests are pre-encoded RESP ``XADD`` commands (``request_id``, ``model_id stub_v1``, 128
  float32 bytes, ``encoding f32``, ``timeout_ms``) over p0..p2 (10/60/30 %), written on one
  plain socket; the XADD replies are read and only counted;
* reply times are taken as Redis pushes them: with ``notify-keyspace-events El``, a
  separate process SUBSCRIBEs to ``__keyevent@<db>__:rpush`` and stamps each message
  carrying a reply key on receipt (CLOCK_MONOTONIC, shared by every process).

Figures, per contender and round:

1. saturation: ``--requests`` XADDs written at once; throughput = requests / (time from the
   first XADD written to the last reply pushed);
2. open loop at each ``--rate`` for ``--duration-s``: requests are written in small bursts
   on a schedule and latency counts from each request's intended send time (no coordinated
   omission): p50 and p99;

with CPU microseconds per request of the consumers and of redis-server (the subscriber's
notifications cost redis-server the same for both). After each phase every reply is read
back and decoded by ``bales_producer``'s ``ClientCore`` (missing, duplicate and error
replies are counted). The table prints medians and [min-max] over ``--rounds`` and the
ratio bales-stream / floor.

Run: ``python -m benchmarks.vs_floor --rounds 3`` (``--quick``: a tiny smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aioredis
from bales_producer import BalesError
from bales_producer.core import ClientCore

from bales_stream.embedded_redis import RedisServer

from . import floor, load

ROOT = load.ROOT
CONTENDERS = ("floor", "bales")
NAMES = {"floor": "floor", "bales": "bales-stream"}
PRIORITY_CYCLE = (0, 1, 1, 1, 1, 1, 1, 2, 2, 2)
"""The priority of request i is ``PRIORITY_CYCLE[i % 10]``: load.py's default 10/60/30 mix."""
TIMEOUT_MS = 60_000
WARMUP_REQUESTS = 256
SUBSCRIBE_TIMEOUT_S = 120.0
"""How long a subscriber waits for the replies of one phase before giving up."""


def resp_command(*parts: bytes) -> bytes:
    """One command in RESP, as a client sends it (an array of bulk strings)."""
    encoded = [b"*%d\r\n" % len(parts)]
    encoded += [b"$%d\r\n%s\r\n" % (len(part), part) for part in parts]
    return b"".join(encoded)


def request_id(phase: str, i: int) -> str:
    """The id of request ``i`` of a phase: fixed width, so the subscriber matches it cheaply."""
    return f"{phase}-{i:08d}"


def xadd_commands(prefix: str, phase: str, count: int) -> list[bytes]:
    """``count`` pre-encoded XADDs of f32 requests for ``stub_v1``."""
    inputs = [row.tobytes() for row in load.make_inputs(1024, "f32")]
    streams = [name.encode() for name in floor.streams(prefix)]
    timeout = str(TIMEOUT_MS).encode()
    return [
        resp_command(
            b"XADD",
            streams[PRIORITY_CYCLE[i % len(PRIORITY_CYCLE)]],
            b"*",
            b"request_id",
            request_id(phase, i).encode(),
            b"model_id",
            b"stub_v1",
            b"input",
            inputs[i % len(inputs)],
            b"encoding",
            b"f32",
            b"timeout_ms",
            timeout,
        )
        for i in range(count)
    ]


def endpoint(url: str) -> tuple[str, int, int]:
    """(host, port, db) of a ``redis://host:port/db`` URL."""
    parts = urlsplit(url)
    db = parts.path.strip("/")
    return parts.hostname or "127.0.0.1", parts.port or 6379, int(db) if db else 0


class RawWriter:
    """One plain connection that writes pre-encoded commands and only counts the replies
    (every XADD reply is one bulk string: one ``$``; an error reply has none)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.replies = 0
        self.sent = 0
        self.task = asyncio.create_task(self._count_replies())

    @classmethod
    async def open(cls, url: str) -> RawWriter:
        """Connect (and SELECT the URL's database if it is not 0)."""
        host, port, db = endpoint(url)
        reader, writer = await asyncio.open_connection(host, port)
        if db:
            writer.write(resp_command(b"SELECT", str(db).encode()))
            await reader.readline()
        return cls(reader, writer)

    async def _count_replies(self) -> None:
        while chunk := await self.reader.read(1 << 16):
            self.replies += chunk.count(b"$")

    async def send(self, commands: list[bytes]) -> None:
        """Write ``commands`` in one burst."""
        self.writer.write(b"".join(commands))
        self.sent += len(commands)
        await self.writer.drain()

    async def settled(self, timeout_s: float = 10.0) -> bool:
        """Wait until every command sent has its reply; False if some did not succeed."""
        deadline_s = time.monotonic() + timeout_s
        while self.replies < self.sent and time.monotonic() < deadline_s:
            await asyncio.sleep(0.01)
        return self.replies == self.sent

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        await self.writer.wait_closed()


def subscribe_role(args: argparse.Namespace) -> None:
    """The subscriber process: stamp each rpush event of a reply key of one phase on
    receipt; print ``ready``, then, once all ``--expect`` are seen (or after
    ``SUBSCRIBE_TIMEOUT_S``), one ``index time`` line per request and ``duplicates N``."""
    host, port, db = endpoint(args.redis_url)
    key_start = re.escape(f"{args.prefix}:reply:{args.phase}-".encode())
    pattern = re.compile(key_start + rb"(\d{8})\r\n")
    sock = socket.create_connection((host, port))
    sock.sendall(resp_command(b"SUBSCRIBE", f"__keyevent@{db}__:rpush".encode()))
    buffer = sock.recv(1 << 16)
    assert b"subscribe" in buffer, buffer
    print("ready", flush=True)
    sock.settimeout(1.0)
    seen: dict[bytes, float] = {}
    duplicates = 0
    buffer = b""
    deadline_s = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while len(seen) < args.expect and time.monotonic() < deadline_s:
        try:
            chunk = sock.recv(1 << 18)
        except TimeoutError:
            continue
        now_s = time.monotonic()
        buffer += chunk
        for index in pattern.findall(buffer):
            if index in seen:
                duplicates += 1
            else:
                seen[index] = now_s
        buffer = buffer[buffer.rfind(b"\r\n") + 2 :]  # a complete key always ends in \r\n
    lines = [f"{int(index)} {t!r}" for index, t in seen.items()]
    sys.stdout.write("\n".join([*lines, f"duplicates {duplicates}", ""]))


class Subscriber:
    """The parent's handle on a subscriber process (``--role=subscribe``)."""

    def __init__(self, process: asyncio.subprocess.Process, count: int) -> None:
        self.process = process
        self.count = count

    @classmethod
    async def start(cls, url: str, prefix: str, phase: str, count: int) -> Subscriber:
        """Start it and wait until it is subscribed."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.vs_floor",
            "--role=subscribe",
            f"--redis-url={url}",
            f"--prefix={prefix}",
            f"--phase={phase}",
            f"--expect={count}",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await process.stdout.readline()
        if line != b"ready\n":
            raise RuntimeError(f"the subscriber did not start: {line!r}")
        return cls(process, count)

    async def times(self) -> tuple[np.ndarray, int]:
        """Reply time of each request (NaN: never seen) and how many duplicate pushes."""
        assert self.process.stdout is not None
        output = (await self.process.stdout.read()).decode().splitlines()
        await self.process.wait()
        stamps = np.full(self.count, np.nan)
        for line in output[:-1]:
            index, stamp = line.split()
            stamps[int(index)] = float(stamp)
        return stamps, int(output[-1].split()[1])


class FloorConsumers(load.Consumers):
    """``--consumers`` ``python -m benchmarks.floor`` processes (no sidecar: a process is
    ready once its connection, named after it, has issued an XREADGROUP)."""

    async def start(self) -> None:
        url, prefix = self.env["REDIS_URL"], self.env["KEY_PREFIX"]
        names = [f"floor-{i}" for i in range(len(self.ports))]
        for name in names:
            self.processes.append(
                await asyncio.create_subprocess_exec(
                    *[sys.executable, "-m", "benchmarks.floor", f"--redis-url={url}"],
                    *[f"--prefix={prefix}", f"--consumer-name={name}"],
                    cwd=ROOT,
                    env=self.env,
                )
            )
        await self._wait_reading(url, names)

    async def _wait_reading(self, url: str, names: list[str]) -> None:
        """Until a connection named after each consumer has issued its first XREADGROUP."""
        redis = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            async with asyncio.timeout(60):
                while True:
                    if any(p.returncode is not None for p in self.processes):
                        raise RuntimeError("a floor consumer exited")
                    clients = await redis.client_list()
                    reading = {c["name"] for c in clients if c["cmd"] == "xreadgroup"}
                    if reading >= set(names):
                        return
                    await asyncio.sleep(0.05)
        finally:
            await redis.aclose()


@dataclass
class Target:
    """One contender in one round: its key prefix, consumers, and the connections used."""

    url: str
    prefix: str
    system: load.System
    writer: RawWriter
    redis: aioredis.Redis

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the consumers, redis-server)."""
        _, consumers_s, server_s = self.system.cpu(0.0)
        return consumers_s, server_s


def cpu_figures(before: tuple[float, float], after: tuple[float, float], count: int) -> dict:
    """CPU microseconds per request of the consumers and redis-server between two samples."""
    count = max(count, 1)
    return {
        "consumer_cpu_us": (after[0] - before[0]) / count * 1e6,
        "redis_cpu_us": (after[1] - before[1]) / count * 1e6,
    }


async def check_replies(redis: aioredis.Redis, prefix: str, phase: str, count: int) -> dict:
    """Read every reply of a phase back through ``ClientCore`` and delete it (so the next
    phase pays no expiry): how many are missing, doubled or errors, the average
    ``batch_size`` the consumers reported, and the first reply as a sample."""
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            key = f"{prefix}:reply:{request_id(phase, i)}"
            pipe.lrange(key, 0, -1)
            pipe.unlink(key)
        replies = (await pipe.execute())[::2]
    errors: dict[str, int] = {}
    batch_sizes = []
    for documents in replies:
        for raw in documents[:1]:
            try:
                batch_sizes.append(ClientCore.check(ClientCore.decode_reply(raw))["batch_size"])
            except BalesError as exc:
                code = getattr(exc, "code", type(exc).__name__)
                errors[code] = errors.get(code, 0) + 1
    return {
        "missing": sum(1 for documents in replies if not documents),
        "duplicates": sum(1 for documents in replies if len(documents) > 1),
        "errors": errors,
        "ok": len(batch_sizes),
        "avg_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        "sample_reply": replies[0][0].decode() if replies[0] else None,
    }


async def warm_up(target: Target) -> None:
    """Answer a few requests first (imports, first model call, connections) and wait for
    every reply key."""
    await target.writer.send(xadd_commands(target.prefix, "warm", WARMUP_REQUESTS))
    keys = [f"{target.prefix}:reply:{request_id('warm', i)}" for i in range(WARMUP_REQUESTS)]
    async with asyncio.timeout(60):
        while await target.redis.exists(*keys) < len(keys):
            await asyncio.sleep(0.05)
    await target.redis.unlink(*keys)


async def saturate(target: Target, count: int) -> dict:
    """``count`` XADDs written at once; throughput from the first write to the last reply."""
    commands = xadd_commands(target.prefix, "sat", count)
    subscriber = await Subscriber.start(target.url, target.prefix, "sat", count)
    cpu_before = target.cpu()
    started_s = time.monotonic()
    await target.writer.send(commands)
    stamps, duplicates = await subscriber.times()
    cpu_after = target.cpu()
    answered = int(np.count_nonzero(~np.isnan(stamps)))
    elapsed_s = float(np.nanmax(stamps)) - started_s if answered else float("nan")
    return {
        "requests": count,
        "answered": answered,
        "pushed_twice": duplicates,
        "throughput": answered / elapsed_s,
        "elapsed_s": elapsed_s,
        **cpu_figures(cpu_before, cpu_after, answered),
    }


async def open_loop(target: Target, rate: float, duration_s: float) -> dict:
    """A fixed ``rate`` for ``duration_s``, written every millisecond or so in bursts of
    what is due; latency from each request's intended send time."""
    count = int(rate * duration_s)
    phase = f"o{int(rate)}"
    commands = xadd_commands(target.prefix, phase, count)
    subscriber = await Subscriber.start(target.url, target.prefix, phase, count)
    cpu_before = target.cpu()
    start_s = time.monotonic() + 0.01
    sent = 0
    while sent < count:
        due = min(count, math.floor((time.monotonic() - start_s) * rate) + 1)
        if due > sent:
            await target.writer.send(commands[sent:due])
            sent = due
        await asyncio.sleep(max(0.0, start_s + sent / rate - time.monotonic()))
    stamps, duplicates = await subscriber.times()
    cpu_after = target.cpu()
    latencies_ms = (stamps - (start_s + np.arange(count) / rate)) * 1000
    answered = latencies_ms[~np.isnan(latencies_ms)]
    return {
        "requests": count,
        "answered": len(answered),
        "pushed_twice": duplicates,
        "p50_ms": float(np.percentile(answered, 50)) if len(answered) else float("nan"),
        "p99_ms": float(np.percentile(answered, 99)) if len(answered) else float("nan"),
        **cpu_figures(cpu_before, cpu_after, len(answered)),
    }


def start_consumers(contender: str, count: int, url: str, prefix: str) -> load.Consumers:
    """The consumer processes of one contender (bales-stream with its default settings)."""
    if contender == "floor":  # one thread, as bales-stream's torch: no BLAS threads spinning
        return FloorConsumers(count, url, prefix, {"OPENBLAS_NUM_THREADS": "1"})
    return load.Consumers(count, url, prefix, {})


async def redis_pid(redis: aioredis.Redis, url: str) -> list[int]:
    """redis-server's pid when it runs on this host (for its CPU), else none."""
    if endpoint(url)[0] not in ("127.0.0.1", "localhost", "::1"):
        return []
    return [int((await redis.info("server"))["process_id"])]


async def contender_round(contender: str, args: argparse.Namespace, prefix: str) -> dict:
    """Start the contender's consumers in a fresh key space, run every phase, check every
    reply, stop the consumers and drop the streams."""
    redis = aioredis.Redis.from_url(args.redis_url)
    consumers = start_consumers(contender, args.consumers, args.redis_url, prefix)
    system = load.System(args.redis_url, prefix, consumers, await redis_pid(redis, args.redis_url))
    writer = await RawWriter.open(args.redis_url)
    target = Target(args.redis_url, prefix, system, writer, redis)
    figures: dict[str, Any] = {"prefix": prefix}
    try:
        await consumers.start()
        await warm_up(target)
        figures["saturate"] = await saturate(target, args.requests)
        figures["saturate"].update(await check_replies(redis, prefix, "sat", args.requests))
        for rate in args.rate:
            name = f"open-{int(rate)}"
            figures[name] = await open_loop(target, rate, args.duration_s)
            phase, count = f"o{int(rate)}", figures[name]["requests"]
            figures[name].update(await check_replies(redis, prefix, phase, count))
        figures["xadds_ok"] = await writer.settled()
    finally:
        await consumers.stop()
        await writer.close()
        await redis.unlink(*floor.streams(prefix))
        await redis.aclose()
    return figures


def round_line(contender: str, figures: dict) -> str:
    """One progress line per contender and round."""
    cells = [f"{NAMES[contender]:<13}"]
    sat = figures["saturate"]
    cells.append(f"sat {sat['throughput']:8,.0f} req/s (batch {sat['avg_batch']:5.1f})")
    for name, phase in figures.items():
        if name.startswith("open-"):
            cells.append(f"{name} p50 {phase['p50_ms']:7.2f} p99 {phase['p99_ms']:8.2f} ms")
    return "  ".join(cells)


async def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; the rounds' figures and their summary."""
    server = None if args.redis_url else RedisServer().start()
    args.redis_url = args.redis_url or server.url  # type: ignore[union-attr]
    admin = aioredis.Redis.from_url(args.redis_url)
    saved = (await admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    await admin.config_set("notify-keyspace-events", "El")
    base = args.prefix or f"vs{uuid.uuid4().hex[:8]}"
    rounds: dict[str, list[dict]] = {contender: [] for contender in CONTENDERS}
    try:
        for n in range(args.rounds):
            order = CONTENDERS if n % 2 == 0 else CONTENDERS[::-1]
            for contender in order:
                figures = await contender_round(contender, args, f"{base}-{contender}{n}")
                rounds[contender].append(figures)
                print(f"  round {n + 1} {round_line(contender, figures)}", flush=True)
    finally:
        await admin.config_set("notify-keyspace-events", saved)
        await admin.aclose()
        if server is not None:
            server.stop()
    return {
        "requests": args.requests,
        "rates": args.rate,
        "duration_s": args.duration_s,
        "consumers": args.consumers,
        "rounds": rounds,
        "summary": summarise(rounds),
    }


FIGURES = {
    "throughput": ("throughput (req/s)", "{:,.0f}"),
    "p50_ms": ("p50 (ms)", "{:.2f}"),
    "p99_ms": ("p99 (ms)", "{:.2f}"),
    "consumer_cpu_us": ("consumers CPU (us/req)", "{:.1f}"),
    "redis_cpu_us": ("redis-server CPU (us/req)", "{:.1f}"),
    "avg_batch": ("avg batch", "{:.1f}"),
}


def summarise(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Per (phase, figure): each contender's median, min and max over the rounds, and the
    ratio of the medians, bales-stream / floor."""
    summary: dict[str, dict] = {}
    phases = [name for name in rounds["floor"][0] if isinstance(rounds["floor"][0][name], dict)]
    for phase in phases:
        for figure in FIGURES:
            if figure not in rounds["floor"][0][phase]:
                continue
            row: dict[str, Any] = {}
            for contender in CONTENDERS:
                values = [r[phase][figure] for r in rounds[contender]]
                row[contender] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
            floor = row["floor"]["median"]
            row["ratio"] = row["bales"]["median"] / floor if floor else float("nan")
            summary[f"{phase} {figure}"] = row
    return summary


def print_table(result: dict) -> None:
    """The summary as a markdown table."""
    rounds = len(result["rounds"]["floor"])
    print(
        f"\n### bales-stream vs the floor: {result['consumers']} consumer processes each, "
        f"medians [min-max] of {rounds} round(s)\n"
    )
    print("| phase | figure | floor | bales-stream | bales-stream / floor |")
    print("|---|---|---|---|---|")
    for key, row in result["summary"].items():
        phase, figure = key.split(" ")
        label, fmt = FIGURES[figure]
        cells = [
            f"{fmt.format(row[c]['median'])} [{fmt.format(row[c]['min'])}-"
            f"{fmt.format(row[c]['max'])}]"
            for c in CONTENDERS
        ]
        print(
            f"| {phase_label(phase, result)} | {label} | {cells[0]} | {cells[1]} | "
            f"{row['ratio']:.2f} |"
        )
    print(
        f"\nsaturation: {result['requests']:,} requests written at once; open loop: "
        f"{result['duration_s']:g} s at each rate. The models differ: bales-stream serves "
        "stub_v1 (torch MLP), the floor one numpy (128, 10) matmul."
    )
    for contender in CONTENDERS:
        faults = _faults(result["rounds"][contender])
        print(f"{NAMES[contender]}: {faults or 'every request answered once, ok'}")


def phase_label(phase: str, result: dict) -> str:
    """``saturate`` -> ``saturation (60,000)``; ``open-2000`` -> ``open 2,000 req/s``."""
    if phase == "saturate":
        return f"saturation ({result['requests']:,})"
    return f"open {int(phase.split('-')[1]):,} req/s"


def _faults(rounds: list[dict]) -> str:
    """Anything that was not one ok reply per request, over every round and phase."""
    problems = []
    for n, figures in enumerate(rounds, start=1):
        if not figures["xadds_ok"]:
            problems.append(f"round {n}: an XADD failed")
        for name, phase in figures.items():
            if not isinstance(phase, dict):
                continue
            lost = phase["requests"] - phase["ok"]
            if lost or phase["duplicates"] or phase["answered"] < phase["requests"]:
                problems.append(
                    f"round {n} {name}: {lost} not ok {phase['errors'] or ''}, "
                    f"{phase['duplicates']} doubled, {phase['answered']} seen"
                )
    return "; ".join(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--consumers", type=int, default=2, help="processes of each kind")
    parser.add_argument("--requests", type=int, default=60_000, help="saturation requests")
    parser.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[10_000.0, 2_000.0],
        help="open-loop rates, req/s, comma-separated (default 10000,2000)",
    )
    parser.add_argument("--duration-s", type=float, default=3.0, help="each open-loop run")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round, 500 requests, 500 req/s, 1 s"
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--prefix", help="base key prefix (default: a fresh one)")
    parser.add_argument(
        "--role", choices=["main", "subscribe"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``--quick`` applied."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.rate, args.duration_s = 1, 500, [500.0], 1.0
    return args


def main() -> None:
    args = parse_args()
    if args.role == "subscribe":
        subscribe_role(args)
        return
    print_table(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
