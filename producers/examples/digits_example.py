"""Classify scikit-learn's held-out digits with the shipped ``digits_v1`` model.

    MODELS_CONFIG=weights/models.toml bales-stream serve         # in one terminal
    python producers/examples/digits_example.py                  # in another

Needs scikit-learn (for the digits) and numpy. Prints the accuracy over the held-out set.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from bales_producer import AsyncClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.train_digits import held_out_split

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
PREFIX = os.environ.get("BALES_PREFIX", "bales")


async def main() -> None:
    _, x_test, _, y_test = held_out_split()
    async with AsyncClient(REDIS_URL, prefix=PREFIX) as client:
        replies = await asyncio.gather(*(client.infer("digits_v1", image) for image in x_test))
    correct = sum(r["result"]["label"] == int(y) for r, y in zip(replies, y_test, strict=True))
    print(
        f"digits_v1 ({replies[0]['model_version']}): {correct}/{len(y_test)} correct "
        f"= {correct / len(y_test):.4f} accuracy"
    )
    print("first reply:", replies[0]["result"])


if __name__ == "__main__":
    asyncio.run(main())
