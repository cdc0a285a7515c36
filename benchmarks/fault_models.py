"""Misbehaving models for fault tests: a slow one and one that raises on a poison input.

They wrap the stub's weights, so their answers match the stub's when they do answer, and
are swapped into a running worker's registry the way a reload would swap a model.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from bales_stream.models import LoadedModel, StubNet

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
