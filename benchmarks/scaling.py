"""The scaling run: saturation throughput and p99 with 1, 2 and 4 consumer processes.

python -m benchmarks.scaling                 # 3 runs each, medians; f32 payload
python -m benchmarks.scaling --runs 5 --duration-s 10 --payload json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from .load import build_parser, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", default="1,2,4", help="consumer counts to try")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--payload", choices=["json", "f32"], default="f32")
    args = parser.parse_args()
    print(f"=== scaling, saturate, {args.payload}, medians of {args.runs} runs ===")
    print(f"{'consumers':>9} {'req/s':>9} {'p99 ms':>8} {'avg batch':>9}  runs (req/s)")
    for count in (int(c) for c in args.consumers.split(",")):
        load_args = build_parser().parse_args(
            [
                "--consumers",
                str(count),
                "--duration-s",
                str(args.duration_s),
                "--payload",
                args.payload,
            ]
        )
        results = [asyncio.run(run(load_args)) for _ in range(args.runs)]
        rates = [r["throughput"] for r in results]
        p99 = statistics.median(r["latency_ms_all"]["p99"] for r in results)
        batch = statistics.median(r["avg_batch"] for r in results)
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(
            f"{count:>9} {statistics.median(rates):>9,.0f} {p99:>8.1f} {batch:>9.1f}  {runs}",
            flush=True,
        )


if __name__ == "__main__":
    main()
