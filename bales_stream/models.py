"""Served models: loading TorchScript, ``torch.export`` (.pt2) and state_dict files, the
built-in stub, and the ``LoadedModel`` every batch runs on.

The model contract: the module takes a float32 tensor of shape ``(batch, *input_shape)`` and
returns a tensor with one row per input, same order; the model type (``model_types``) turns
the rows into result dicts. state_dict files are only ever read with
``torch.load(weights_only=True)``: no arbitrary unpickling; every file comes from
WEIGHTS_DIR (see ``registry.confine``). TorchScript and ``torch.export`` archives can run
code when loaded: pin their sha256 (``ModelConfig.sha256``). A file is read once; its bytes
are hashed, checked against the pin and loaded from memory, so the file cannot change between
the check and the load.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError
from .model_config import ModelConfig, stub_config
from .model_types import Classification, ModelType, make_model_type
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


ARCHITECTURES: dict[str, type[nn.Module]] = {"stub": StubNet}
"""Built-in architectures that ``state_dict`` weight files can be loaded into."""


@dataclass(frozen=True)
class LoadedModel:
    """One immutable, warmed-up model version. Swapping models swaps these references."""

    spec: ModelSpec
    version: str
    module: Callable[[torch.Tensor], torch.Tensor]
    kind: ModelType = field(default_factory=Classification)

    @property
    def model_id(self) -> str:
        """The id requests use to name this model."""
        return self.spec.model_id

    def predict(self, batch: np.ndarray) -> list[dict[str, Any] | None]:
        """Run a batch through the model and its type's post-processing (in the executor,
        never on the event loop). A request whose output row is not finite (NaN or
        infinity: its input overflowed the model's arithmetic) gets None, not a result."""
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(batch))
            results: list[dict[str, Any] | None] = list(self.kind.postprocess(outputs))
            if not bool(torch.isfinite(outputs).all()):  # one check per batch
                finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
                results = [
                    r if ok else None for r, ok in zip(results, finite.tolist(), strict=True)
                ]
            return results

    def warm_up(self) -> None:
        """Run one dummy batch (of 2, so a model that cannot batch fails here, not later)."""
        results = self.predict(np.zeros((2, *self.spec.input_shape), dtype=np.float32))
        if len(results) != 2:
            raise ModelLoadError(
                f"model {self.model_id} returned {len(results)} results for a batch of 2"
            )


def load_model(config: ModelConfig, path: Path, sha256: str | None = None) -> LoadedModel:
    """Load, check and warm up a model file as its config says (run it in the executor).

    The file's sha256 must equal ``sha256`` when given (an admin's reload), else the
    config's pin when it has one; otherwise ``ModelLoadError`` (409) and nothing is loaded."""
    data = read_weights(
        path, sha256 or config.sha256, "the reload request" if sha256 else "MODELS_CONFIG"
    )
    module, state = _load_module(config, path, data)
    kind = make_model_type(config.model_type, config.options)
    spec = ModelSpec(config.model_id, getattr(kind, "name", config.model_type), config.input_shape)
    model = LoadedModel(spec, f"{path.stem}-{weights_hash(state)}", module, kind)
    try:
        model.warm_up()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} failed its warm-up batch of shape {[2, *config.input_shape]}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return model


def read_weights(path: Path, expected_sha256: str | None, pinned_by: str) -> bytes:
    """The bytes of a weights file, refused (409) unless their sha256 is ``expected_sha256``
    (when given; ``pinned_by`` says where that hash came from)."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist", 404)
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ModelLoadError(
                f"weights file {path.name} has sha256 {actual}, but {pinned_by} expects "
                f"{expected_sha256}: refused",
                409,
            )
    return data


def _load_module(
    config: ModelConfig, path: Path, data: bytes
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]:
    try:
        if config.format == "torchscript":
            scripted = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
            return scripted, dict(scripted.state_dict())
        if config.format == "export":
            program = torch.export.load(io.BytesIO(data))
            return program.module(), dict(program.state_dict)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelLoadError(
            f"weights file {path.name} does not load as {config.format}: {exc}"
        ) from None
    return _from_state_dict(config, path, state), state


def _from_state_dict(config: ModelConfig, path: Path, state: object) -> nn.Module:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path.name} is not a state_dict of tensors")
    architecture = ARCHITECTURES.get(config.architecture or "")
    if architecture is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"architecture {config.architecture!r} is unknown: built in: {known}")
    net = architecture()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(
            f"weights do not fit the {config.architecture} architecture: {exc}"
        ) from None
    return net.eval()


def load_stub_file(model_id: str, path: Path) -> LoadedModel:
    """Load stub weights from a state_dict file (``torch.load(weights_only=True)``)."""
    return load_model(stub_config(model_id), path)


def builtin_stub(model_id: str) -> LoadedModel:
    """The stub with its reproducible built-in weights (no file needed)."""
    name = model_id if model_id in STUB_SEEDS else "stub_v1"
    state = stub_state_dict(STUB_SEEDS[name])
    net = StubNet()
    net.load_state_dict(state)
    spec = ModelSpec(model_id, CLASSIFICATION, (STUB_INPUT_SIZE,))
    model = LoadedModel(spec, f"{name}-{weights_hash(state)}", net.eval())
    model.warm_up()
    return model


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
