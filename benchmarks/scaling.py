"""The scaling run: saturation throughput with 1 Redis node or an N-primary Redis Cluster,
and 1, 2 and 4 consumer processes; which resource was the limit.

python -m benchmarks.scaling                          # 1 node vs 3 primaries; 1,2,4 consumers
python -m benchmarks.scaling --primaries 1 --runs 5   # one node only
python -m benchmarks.scaling --payload json --duration-s 10

"1 primary" is one plain redis-server (SHARDS=1); N > 1 primaries is a local Redis Cluster
with SHARDS=N (``--shards`` to change), so each primary holds one shard. Runs are
interleaved (every setup once, then again) so the machine's noise spreads over all of them;
each cell is the median of ``--runs``. The limit column: CPU seconds used per wall second by
producer + consumers + redis-servers (the machine's cores: ``os.cpu_count()``); when that
is 80% of the cores or more, the machine's CPU, not Redis or the design, was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path

from .load import ROOT, build_parser, run

CPU_BOUND_SHARE = 0.8
"""A run that keeps this share of the cores busy is called CPU-bound (on a shared machine
the rest goes to other tenants, the kernel and the benchmark's own bookkeeping)."""


def load_args(args: argparse.Namespace, primaries: int, consumers: int) -> argparse.Namespace:
    """The ``benchmarks.load`` options of one cell."""
    options = ["--consumers", str(consumers), "--duration-s", str(args.duration_s)]
    options += ["--payload", args.payload, "--producers", str(args.producers)]
    if primaries > 1:
        options += ["--cluster", str(primaries), "--shards", str(args.shards or primaries)]
    return build_parser().parse_args(options)


def cores_busy(result: dict) -> float:
    """CPU seconds per wall second of everything in the run (producer, consumers, Redis)."""
    cpu_us = sum(v for v in result["cpu_us_per_request"].values() if v is not None)
    return cpu_us * result["throughput"] / 1e6


def limit_of(cell: list[dict]) -> str:
    """Which resource bounded the cell: the cores, else the biggest CPU user."""
    busy = statistics.median(cores_busy(r) for r in cell)
    cores = os.cpu_count() or 1
    shares = {
        name: statistics.median(r["cpu_us_per_request"][name] or 0.0 for r in cell)
        for name in ("producer", "consumers", "redis")
    }
    biggest = max(shares, key=lambda name: shares[name])
    verdict = "CPU-bound" if busy >= CPU_BOUND_SHARE * cores else "not CPU-bound"
    return f"{verdict}: {busy:.2f} of {cores} cores busy, most CPU: {biggest}"


def print_table(cells: dict[tuple[int, int], list[dict]]) -> None:
    """One row per (primaries, consumers): medians and the limit."""
    print(
        f"{'primaries':>9} {'shards':>6} {'consumers':>9} {'req/s':>9} {'p99 ms':>8}"
        f" {'CPU us/req prod/cons/redis':>27}  limit; runs (req/s)"
    )
    for (primaries, consumers), cell in cells.items():
        rate = statistics.median(r["throughput"] for r in cell)
        p99 = statistics.median(r["latency_ms_all"]["p99"] for r in cell)
        cpu = [
            statistics.median(r["cpu_us_per_request"][n] or 0.0 for r in cell)
            for n in ("producer", "consumers", "redis")
        ]
        runs = ", ".join(f"{r['throughput']:,.0f}" for r in cell)
        cpu_text = "/".join(f"{c:.1f}" for c in cpu)
        print(
            f"{primaries:>9} {cell[0]['shards']:>6} {consumers:>9} {rate:>9,.0f} {p99:>8.1f}"
            f" {cpu_text:>27}  {limit_of(cell)}; {runs}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--primaries", default="1,3", help="1 = one node; N = N-primary cluster")
    parser.add_argument("--consumers", default="1,2,4", help="consumer counts to try")
    parser.add_argument("--shards", type=int, default=0, help="SHARDS on a cluster (0: primaries)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--payload", choices=["json", "f32"], default="f32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling")
    args = parser.parse_args()
    setups = [
        (int(p), int(c)) for p in args.primaries.split(",") for c in args.consumers.split(",")
    ]
    cells: dict[tuple[int, int], list[dict]] = {setup: [] for setup in setups}
    for round_no in range(1, args.runs + 1):
        for primaries, consumers in setups:
            result = asyncio.run(run(load_args(args, primaries, consumers)))
            cells[(primaries, consumers)].append(result)
            print(
                f"  round {round_no}: {primaries} primaries, {consumers} consumers: "
                f"{result['throughput']:,.0f} req/s, errors {sum(result['errors'].values())}",
                flush=True,
            )
    print(f"=== scaling, saturate {args.payload}, medians of {args.runs} interleaved runs ===")
    print_table(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {f"{p}x{c}": [_slim(r) for r in cell] for (p, c), cell in cells.items()}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


def _slim(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "latency_curve_ms"}


if __name__ == "__main__":
    main()
