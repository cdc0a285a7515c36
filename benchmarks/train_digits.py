"""Train the shipped example model: a small MLP on scikit-learn's digits (8x8 images, 10
classes), saved as TorchScript to ``weights/digits_mlp.pt``.

    python -m benchmarks.train_digits            # needs scikit-learn (in the dev extra)

The split is fixed (``test_size=0.25, random_state=0``) so the test suite can check the
shipped file's accuracy on the same held-out digits. Inputs are pixel values / 16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0


def held_out_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): the digits, scaled to [0, 1], float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(  # type: ignore[no-any-return]
        x,
        digits.target,
        test_size=HELD_OUT_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )


class DigitsMLP(nn.Module):
    """64 pixels -> 64 hidden -> 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train(epochs: int = 150, seed: int = 0) -> tuple[nn.Module, float]:
    """Train on the training split; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = held_out_split()
    model = DigitsMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(128):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return model, float((predicted == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "digits_mlp.pt")
    parser.add_argument("--epochs", type=int, default=150)
    args = parser.parse_args()
    model, accuracy = train(args.epochs)
    torch.jit.script(model).save(str(args.out))
    print(f"held-out accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
