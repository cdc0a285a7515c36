"""Classify scikit-learn's held-out digits with the shipped ``digits_v1`` model (an MLP on
64 floats) and ``digits_cnn`` (a CNN on uint8 8x8 images, sent as a safetensors tensor).

    MODELS_CONFIG=weights/models.toml bales-stream serve         # in one terminal
    python producers/examples/digits_example.py                  # in another

Needs scikit-learn (for the digits), numpy and safetensors. Prints each model's accuracy over
the held-out set.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
from bales_producer import AsyncClient

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
PREFIX = os.environ.get("BALES_PREFIX", "bales")


def held_out_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): the digits scaled to [0, 1], split as the shipped
    models were trained (a quarter held out, stratified, seed 0), so the test part was never
    seen in training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )


def report(replies: list[dict], labels: np.ndarray) -> None:
    correct = sum(r["result"]["label"] == int(y) for r, y in zip(replies, labels, strict=True))
    print(
        f"{replies[0]['model_id']} ({replies[0]['model_version']}): {correct}/{len(labels)} "
        f"correct = {correct / len(labels):.4f} accuracy"
    )


async def main() -> None:
    _, x_test, _, y_test = held_out_split()  # 64 floats in [0, 1] per digit
    images = np.rint(x_test * 255).astype(np.uint8).reshape(-1, 8, 8)  # uint8 pixels
    async with AsyncClient(REDIS_URL, prefix=PREFIX) as client:
        mlp = await asyncio.gather(*(client.infer("digits_v1", x) for x in x_test))
        cnn = await asyncio.gather(*(client.infer("digits_cnn", {"image": i}) for i in images))
    report(mlp, y_test)
    report(cnn, y_test)
    print("first reply:", cnn[0]["result"])


if __name__ == "__main__":
    asyncio.run(main())
