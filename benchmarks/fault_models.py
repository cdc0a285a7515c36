"""Misbehaving models for fault tests: a slow one and one that raises on a poison input.

They wrap the stub's weights, so their answers match the stub's when they do answer. The
classes are swapped into an in-process worker's registry; ``write_fault_models`` writes the
same two as files and a models file, for real consumer processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bales_stream.model_types import Classification
from bales_stream.models import STUB_SEEDS, LoadedModel, StubNet, stub_state_dict

POISON = 42.0
"""An input whose first value is this makes ``PoisonSensitive`` raise."""


class Slow(StubNet):
    """The stub, taking ``delay_s`` longer per batch; counts the rows it computed."""

    def __init__(self, base: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.load_state_dict(base.state_dict())
        self.delay_s = delay_s
        self.rows = 0
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.rows += x.shape[0]
        time.sleep(self.delay_s)  # the model is slow; nothing waits on this
        return super().forward(x)


class PoisonSensitive(StubNet):
    """The stub, raising on any batch holding a row whose first value is ``POISON``;
    counts how often the poison row was computed alone (once per delivery)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.load_state_dict(base.state_dict())
        self.poison_calls = 0
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poisoned = x[:, 0] == POISON
        if bool(poisoned.any()):
            with self._lock:
                self.poison_calls += x.shape[0] == 1
            raise ValueError("poisoned input")
        return super().forward(x)


def swap_module(registry: object, model_id: str, module: nn.Module) -> None:
    """Serve ``module`` under ``model_id`` (same spec and version) in a worker's registry."""
    current: LoadedModel = registry.get(model_id)  # type: ignore[attr-defined]
    registry._models[model_id] = LoadedModel(current.spec, current.version, module)  # type: ignore[attr-defined]


class SlowClassification(Classification):
    """A model type whose post-processing takes ``delay_s`` per batch: a slow model that a
    consumer process can load from a models file (``model_type = "benchmarks.fault_models:
    SlowClassification"``)."""

    def __init__(self, delay_s: float = 1.0) -> None:
        super().__init__()
        self.delay_s = delay_s

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        time.sleep(self.delay_s)  # the model is slow; nothing waits on this
        return super().postprocess(outputs)


class _PoisonNet(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 42.0).any()):
            raise RuntimeError("poisoned input")
        return self.inner(x)


def write_fault_models(directory: Path, slow_delay_s: float) -> Path:
    """Write a models file serving ``slow`` (the stub, ``slow_delay_s`` per batch) and
    ``poison`` (the stub as TorchScript, raising on an input starting with ``POISON``)
    into ``directory``; returns the models file, for real consumer processes."""
    directory.mkdir(parents=True, exist_ok=True)
    stub = StubNet()
    stub.load_state_dict(stub_state_dict(STUB_SEEDS["stub_v1"]))
    torch.save(stub.state_dict(), directory / "stub_v1.pt")
    torch.jit.script(_PoisonNet(stub.eval())).save(str(directory / "poison.pt"))
    config = directory / "models.toml"
    config.write_text(f"""
[[models]]
model_id = "slow"
model_type = "benchmarks.fault_models:SlowClassification"
format = "state_dict"
architecture = "stub"
file = "stub_v1.pt"
input_shape = [128]
options = {{ delay_s = {slow_delay_s} }}

[[models]]
model_id = "poison"
model_type = "classification"
format = "torchscript"
file = "poison.pt"
input_shape = [128]
""")
    return config
