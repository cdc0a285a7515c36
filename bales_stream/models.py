"""Served models: the ``LoadedModel`` contract, the built-in stub and safe weight loading.

The model contract: ``predict(batch)`` takes a float32 array of shape
``(batch_size, *input_shape)`` and returns one result dict per row, same length, same order.
Weights are only ever read with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError
from .protocol import ModelSpec

CLASSIFICATION = "classification"
STUB_INPUT_SIZE = 128
STUB_HIDDEN_SIZE = 64
STUB_CLASSES = 10
STUB_SEEDS = {"stub_v1": 1, "stub_v2": 2}
"""The reproducible stub weight files: name -> seed (``python -m bales_stream.models``)."""


class StubNet(nn.Module):
    """The built-in stub classifier: 128 floats -> 10 classes (a two-layer MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(STUB_INPUT_SIZE, STUB_HIDDEN_SIZE)
        self.out = nn.Linear(STUB_HIDDEN_SIZE, STUB_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def stub_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Deterministic stub weights for ``seed`` (the same on every machine)."""
    generator = torch.Generator().manual_seed(seed)
    net = StubNet()
    return {
        name: torch.randn(tensor.shape, generator=generator) * 0.5
        for name, tensor in net.state_dict().items()
    }


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes and values), 12 hex chars."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LoadedModel:
    """One immutable, warmed-up model version. Swapping models swaps these references."""

    spec: ModelSpec
    version: str
    module: nn.Module

    @property
    def model_id(self) -> str:
        """The id requests use to name this model."""
        return self.spec.model_id

    def predict(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """Classify a batch (run it in the executor, never on the event loop)."""
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(batch))
            confidence, label = torch.softmax(logits, dim=1).max(dim=1)
        return [
            {"label": lab, "confidence": conf}
            for lab, conf in zip(label.tolist(), confidence.tolist(), strict=True)
        ]

    def warm_up(self) -> None:
        """Run one dummy batch so the first real batch pays no first-call cost."""
        self.predict(np.zeros((1, *self.spec.input_shape), dtype=np.float32))


def build_stub(model_id: str, state: dict[str, torch.Tensor], label: str) -> LoadedModel:
    """A warmed-up stub classifier with the given weights."""
    net = StubNet()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"weights do not fit the stub architecture: {exc}") from None
    net.eval()
    spec = ModelSpec(model_id, CLASSIFICATION, (STUB_INPUT_SIZE,))
    model = LoadedModel(spec, f"{label}-{weights_hash(state)}", net)
    model.warm_up()
    return model


def load_stub_file(model_id: str, path: Path) -> LoadedModel:
    """Load stub weights from a file with ``torch.load(weights_only=True)``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {path} does not exist") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelLoadError(f"weights file {path.name} does not load: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path.name} is not a state_dict of tensors")
    return build_stub(model_id, state, path.stem)


def builtin_stub(model_id: str) -> LoadedModel:
    """The stub with its reproducible built-in weights (no file needed)."""
    name = model_id if model_id in STUB_SEEDS else "stub_v1"
    return build_stub(model_id, stub_state_dict(STUB_SEEDS[name]), name)


def write_stub_weights(directory: Path) -> list[Path]:
    """Write every reproducible stub weights file into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in STUB_SEEDS.items():
        path = directory / f"{name}.pt"
        torch.save(stub_state_dict(seed), path)
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m bales_stream.models [DIR]
    import sys

    for written in write_stub_weights(Path(sys.argv[1] if len(sys.argv) > 1 else "weights")):
        print(f"wrote {written}")
