"""Served models: loading TorchScript, ``torch.export`` (.pt2), state_dict and safetensors
files, the built-in stub, and the ``LoadedModel`` every batch runs on.

The model contract: the module takes one tensor per declared input, positionally in the
declared order, each ``(batch, *shape)`` (a model declaring only ``input_shape`` takes one
float32 tensor), and returns a tensor, a tuple of tensors or a dict of tensors (named by
the declared ``outputs``), each with one row per request, same order; the model type
(``model_types``) turns them into result dicts. state_dict files are only ever read with
``torch.load(weights_only=True)``, safetensors files with ``safetensors`` (no pickle at
all); every file comes from WEIGHTS_DIR (see ``registry.confine``). TorchScript and
``torch.export`` archives can run code when loaded: pin their sha256
(``ModelConfig.sha256``). A file is read once; its bytes are hashed, checked against the pin
and loaded from memory, so the file cannot change between the check and the load.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import safetensors.torch
import torch
from tokenizers import Tokenizer
from torch import nn

from .architectures import DigitsCNN
from .errors import ModelLoadError
from .model_config import ModelConfig, stub_config
from .model_types import Classification, ModelType, import_path, make_model_type
from .tensors import Batch, Dim, ModelOutputs, ModelSpec, collate
from .text import TextEncoder, parse_tokenizer

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


ARCHITECTURES: dict[str, type[nn.Module]] = {"stub": StubNet, "digits_cnn": DigitsCNN}
"""Built-in architectures that state_dict and safetensors weight files load into (any
other: ``package.module:Class``, a module class whose constructor takes no arguments)."""


class ModelInput(Protocol):
    """What a batch needs from each request: its named arrays, or its text."""

    @property
    def inputs(self) -> Mapping[str, np.ndarray]: ...

    @property
    def text(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class _Dummy:
    inputs: Mapping[str, np.ndarray]
    text: str | None = None


@dataclass
class Prediction:
    """A batch's results (None for a request whose output is not finite) and its padding."""

    results: list[dict[str, Any] | None]
    real_elements: int = 0
    padded_elements: int = 0


@dataclass(frozen=True)
class LoadedModel:
    """One immutable, warmed-up model version. Swapping models swaps these references."""

    spec: ModelSpec
    version: str
    module: Callable[..., Any]
    kind: ModelType = field(default_factory=Classification)
    output_shapes: tuple[tuple[str, tuple[Dim, ...] | None], ...] = ()
    """Declared outputs, in the order the module returns them: (name, shape or None)."""
    text: TextEncoder | None = None
    threads: int | None = None
    """Torch intra-op threads for this model's batches (None: the executor's default)."""

    @property
    def model_id(self) -> str:
        """The id requests use to name this model."""
        return self.spec.model_id

    def predict(self, requests: Sequence[ModelInput]) -> Prediction:
        """Run a batch through the model and its type's post-processing (in the executor,
        never on the event loop). A request whose output is not finite (NaN or infinity:
        its input overflowed the model's arithmetic) gets None, not a result."""
        batch = collate(self.spec, self._tensors(requests))
        with torch.inference_mode():
            raw = self.module(*(batch.tensors[s.name] for s in self.spec.inputs))
            outputs = self._named(raw, batch)
            if getattr(self.kind, "takes_outputs", False):
                results: list[dict[str, Any] | None] = list(self.kind.postprocess(outputs))
            else:
                results = list(self.kind.postprocess(outputs.get()))
            if not all(bool(torch.isfinite(t).all()) for t in outputs.tensors.values()):
                results = [r if r is not None and _finite(r) else None for r in results]
        return Prediction(results, batch.real_elements, batch.padded_elements)

    def predict_array(self, batch: np.ndarray) -> list[dict[str, Any] | None]:
        """The results of a stacked batch of a single-input model (``(batch, *shape)``)."""
        name = self.spec.inputs[0].name
        return self.predict([_Dummy({name: row}) for row in batch]).results

    def _tensors(self, requests: Sequence[ModelInput]) -> list[Mapping[str, np.ndarray]]:
        """Each request's named arrays; text requests are tokenised here, together."""
        texts = [r.text for r in requests if r.text is not None]
        if not texts or self.text is None:
            return [r.inputs for r in requests]
        encoded = iter(self.text.encode(texts))
        return [next(encoded) if r.text is not None else r.inputs for r in requests]

    def _named(self, raw: Any, batch: Batch) -> ModelOutputs:
        """The module's return value as named outputs."""
        names = [name for name, _ in self.output_shapes]
        if isinstance(raw, torch.Tensor):
            tensors = {names[0] if names else "output": raw}
        elif isinstance(raw, Mapping):
            tensors = {str(k): v for k, v in raw.items() if not names or k in names}
        elif isinstance(raw, Sequence):
            tensors = {names[i] if i < len(names) else f"output_{i}": t for i, t in enumerate(raw)}
        else:
            raise TypeError(f"model returned {type(raw).__name__}, not tensors")
        shapes = {name: shape for name, shape in self.output_shapes if shape is not None}
        return ModelOutputs(tensors, batch, shapes)

    def warm_up(self) -> None:
        """Run one dummy batch of 2 (of different lengths where a dimension is variable),
        so a model that cannot batch or pad fails here, not later."""
        if self.text is not None:
            dummies = [_Dummy({}, ""), _Dummy({}, "warm up")]
        else:
            dummies = [_Dummy(self._dummy_tensors(n)) for n in (2, 3)]
        results = self.predict(dummies).results
        if len(results) != 2:
            raise ModelLoadError(
                f"model {self.model_id} returned {len(results)} results for a batch of 2"
            )

    def _dummy_tensors(self, length: int) -> dict[str, np.ndarray]:
        tensors = {}
        for spec in self.spec.inputs:
            shape = [
                d if isinstance(d, int) else min(length, self.spec.max_dim(d) or length)
                for d in spec.shape
            ]
            value = 0 if spec.storage.kind == "f" else 1
            tensors[spec.name] = np.full(shape, value, dtype=spec.storage)
        return tensors


def _finite(result: dict[str, Any]) -> bool:
    """False when a float (or array of floats) in a result is NaN or infinite."""
    for value in result.values():
        if isinstance(value, float) and not np.isfinite(value):
            return False
        if (
            isinstance(value, np.ndarray)
            and value.dtype.kind == "f"
            and not np.isfinite(value).all()
        ):
            return False
        if isinstance(value, list) and not _finite({str(i): v for i, v in enumerate(value)}):
            return False
        if isinstance(value, dict) and not _finite(value):
            return False
    return True


def load_model(
    config: ModelConfig,
    path: Path,
    sha256: str | None = None,
    tokenizer_path: Path | None = None,
) -> LoadedModel:
    """Load, check and warm up a model file as its config says (run it in the executor).

    The file's sha256 must equal ``sha256`` when given (an admin's reload), else the
    config's pin when it has one; otherwise ``ModelLoadError`` (409) and nothing is loaded.
    ``tokenizer_path``: the config's tokenizer file, already confined to WEIGHTS_DIR."""
    data = read_weights(
        path, sha256 or config.sha256, "the reload request" if sha256 else "MODELS_CONFIG"
    )
    module, state = _load_module(config, path, data)
    kind = make_model_type(config.model_type, config.options)
    tokenizer = _tokenizer(config, tokenizer_path)
    vocabulary = tokenizer.get_vocab_size() if tokenizer is not None else None
    spec = config.spec(getattr(kind, "name", config.model_type), vocabulary)
    outputs = tuple((o.name, o.shape) for o in config.outputs)
    text = None
    if tokenizer is not None and config.tokenizer is not None:
        text = TextEncoder(tokenizer, spec.inputs, config.tokenizer.max_length)
    version = f"{path.stem}-{weights_hash(state)}"
    model = LoadedModel(spec, version, module, kind, outputs, text, config.intra_op_threads)
    try:
        model.warm_up()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} failed its warm-up batch of 2 ({_inputs_text(spec)}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return model


def _inputs_text(spec: ModelSpec) -> str:
    if not spec.named:
        return f"shape {[2, *spec.input_shape]}"
    return ", ".join(s.describe() for s in spec.inputs)


def _tokenizer(config: ModelConfig, path: Path | None) -> Tokenizer | None:
    if config.tokenizer is None:
        return None
    if path is None:
        raise ModelLoadError(f"{config.model_id}: its tokenizer file was not given")
    data = read_weights(path, config.tokenizer.sha256, "MODELS_CONFIG (tokenizer.sha256)")
    return parse_tokenizer(data, path.name, config.tokenizer.max_length)


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
        if config.format == "safetensors":
            state = safetensors.torch.load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelLoadError(
            f"weights file {path.name} does not load as {config.format}: {exc}"
        ) from None
    return _from_state_dict(config, path, state), state


def _from_state_dict(config: ModelConfig, path: Path, state: object) -> nn.Module:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path.name} is not a state_dict of tensors")
    net = _architecture(config.architecture or "")
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(
            f"weights do not fit the {config.architecture} architecture: {exc}"
        ) from None
    return net.eval()


def _architecture(name: str) -> nn.Module:
    """A fresh module of a built-in architecture, or of ``package.module:Class``."""
    if ":" in name:
        factory = import_path(name, "architecture")
    elif name in ARCHITECTURES:
        factory = ARCHITECTURES[name]
    else:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"architecture {name!r} is unknown: built in: {known}, or package.module:Class"
        )
    net = factory()
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"architecture {name!r} does not make a torch.nn.Module")
    return net


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
