"""The models file (``MODELS_CONFIG``, TOML): which models a consumer serves, and how.

::

    [[models]]
    model_id = "digits_v1"            # what requests name
    model_type = "classification"     # or regression, embedding, or "package.module:Class"
    format = "torchscript"            # torchscript | export (.pt2) | state_dict
    file = "digits_mlp.pt"            # inside WEIGHTS_DIR
    input_shape = [64]                # one request's input; batches add a leading dimension
    sha256 = "<64 lowercase hex>"     # optional: the file's sha256 (sha256sum); else refused
    max_batch_size = 64               # optional: overrides MAX_BATCH_SIZE for this model
    batch_window_ms = 2.0             # optional: overrides BATCH_WINDOW_MS for this model
    options = { top_k = 3 }           # optional: passed to the model type
    intra_op_threads = 1              # optional: torch threads per batch of this model

    [[models]]                        # typed, named inputs; a named dimension is variable
    model_id = "text_embed_demo"
    model_type = "embedding"
    format = "export"
    file = "text_embed_demo.pt2"
    tokenizer = { file = "text_demo_tokenizer.json", max_length = 128 }  # encoding=text
    options = { pooling = "mean" }
    inputs = [
      { name = "input_ids", dtype = "int64", shape = ["seq"], pad = 0 },
      { name = "attention_mask", dtype = "int64", shape = ["seq"], pad = 0 },
    ]
    max_dims = { seq = 128 }          # optional bounds of variable dimensions
    outputs = [{ name = "last_hidden_state", shape = ["seq", 64] }]

    [[models]]
    model_id = "stub_v1"
    model_type = "classification"
    format = "state_dict"
    architecture = "stub"             # a built-in architecture, for state_dict files
    file = "stub_v1.pt"
    input_shape = [128]

Without a models file, the consumer serves ``DEFAULT_MODEL_ID`` (the stub) as before.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import ModelLoadError
from .tensors import DTYPES, ModelSpec, TensorSpec

MODEL_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$"
"""Tensor and dimension names."""
TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The inputs a tokenizer fills (a text model declares only these)."""
Sha256 = Annotated[str | None, AfterValidator(lambda v: v if v is None else check_sha256(v))]
"""An optional file pin: 64 lowercase hex characters, as sha256sum prints."""
DtypeName = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]


class InputConfig(BaseModel):
    """One declared input (see ``tensors.TensorSpec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    dtype: DtypeName = "float32"
    shape: tuple[int | str, ...] = ()
    pad: float = 0
    """The value that pads a variable dimension (e.g. the pad token id; 0 for a mask)."""
    range: tuple[float, float] | None = None
    """The smallest and largest value a request may send (else refused)."""
    mask: bool | None = None
    """A mask input: only 0/1 and at least one 1 (default: true for ``attention_mask``)."""

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        _check_shape(self.shape)
        kind = DTYPES[self.dtype][0].kind
        if kind in "iub" and not float(self.pad).is_integer():
            raise ValueError(f"input {self.name}: pad {self.pad} is not a {self.dtype} value")
        if kind in "iu":
            info = np.iinfo(DTYPES[self.dtype][0])
            if not info.min <= self.pad <= info.max:
                raise ValueError(f"input {self.name}: pad {self.pad} is out of {self.dtype} range")
        if kind == "b" and self.pad not in (0, 1):
            raise ValueError(f"input {self.name}: pad of a bool input must be 0 or 1")
        return self

    def spec(self, vocabulary_size: int | None = None) -> TensorSpec:
        """The runtime form; ``input_ids`` of a model with a tokenizer of
        ``vocabulary_size`` tokens take ids 0 to vocabulary_size - 1 unless a range is set."""
        value_range = self.range
        if value_range is None and vocabulary_size and self.name == "input_ids":
            value_range = (0, vocabulary_size - 1)
        mask = self.mask if self.mask is not None else self.name == "attention_mask"
        return TensorSpec(self.name, self.dtype, self.shape, self.pad, value_range, mask)


class OutputConfig(BaseModel):
    """One declared output: the n-th tensor the module returns (or its key, for a dict).
    A dimension named like an input's variable dimension is cut to each request's size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    shape: tuple[int | str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        _check_shape(self.shape or ())
        return self


class TokenizerConfig(BaseModel):
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``) that makes a model take text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    """Inside WEIGHTS_DIR."""
    max_length: int = Field(ge=2, le=65_536)
    """Longer texts are truncated to this many tokens (special tokens included)."""
    sha256: Sha256 = None


def _check_shape(shape: tuple[int | str, ...]) -> None:
    for dim in shape:
        if isinstance(dim, int) and dim < 1:
            raise ValueError(f"shape sizes must be >= 1, got {list(shape)}")
        if isinstance(dim, str) and not re.fullmatch(NAME_PATTERN, dim):
            raise ValueError(f"dimension name {dim!r} must match {NAME_PATTERN}")


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    model_type: str = "classification"
    format: Literal["torchscript", "export", "state_dict", "safetensors"]
    file: str = Field(min_length=1)
    input_shape: tuple[int, ...] | None = Field(None, min_length=1)
    """One float32 input of this shape (a model that declares no ``inputs``)."""
    input_dtype: Literal["float32"] = "float32"
    inputs: tuple[InputConfig, ...] | None = Field(None, min_length=1, max_length=16)
    max_dims: dict[str, int] = Field(default_factory=dict)
    outputs: tuple[OutputConfig, ...] = Field((), max_length=16)
    tokenizer: TokenizerConfig | None = None
    bucketing: bool = True
    """Batch requests of similar length together (models with variable dimensions)."""
    intra_op_threads: int | None = Field(None, ge=1, le=256)
    """Torch intra-op threads for this model's batches (default: INTRA_OP_THREADS)."""
    architecture: str | None = None
    """For state_dict and safetensors files: a built-in architecture or package.module:Class."""
    sha256: Sha256 = None
    """The weights file's sha256 (64 lowercase hex): a file with another hash is refused."""
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    batch_window_ms: float | None = Field(None, ge=0, le=10_000)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.input_shape is None) == (self.inputs is None):
            raise ValueError("declare exactly one of input_shape (one float32 input) or inputs")
        if self.input_shape is not None and any(size < 1 for size in self.input_shape):
            raise ValueError(f"input_shape sizes must be >= 1, got {list(self.input_shape)}")
        if self.format in ("state_dict", "safetensors") and not self.architecture:
            raise ValueError(
                f"format {self.format} needs an architecture (built in, or package.module:Class)"
            )
        self._check_inputs()
        return self

    def _check_inputs(self) -> None:
        names = [i.name for i in self.inputs or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        dims = {d for i in self.inputs or () for d in i.shape if isinstance(d, str)}
        for dim, bound in self.max_dims.items():
            if dim not in dims or bound < 1:
                raise ValueError(f"max_dims: {dim} is not a variable input dimension, or < 1")
        if self.tokenizer is not None:
            if self.inputs is None or "input_ids" not in names:
                raise ValueError("a model with a tokenizer declares an input_ids input")
            unfilled = [n for n in names if n not in TOKENIZER_INPUTS]
            if unfilled:
                raise ValueError(
                    f"a tokenizer fills only {', '.join(TOKENIZER_INPUTS)}; not {unfilled[0]}"
                )

    def spec(self, model_type: str, vocabulary_size: int | None = None) -> ModelSpec:
        """The runtime interface of this model (``model_type``: the type's name;
        ``vocabulary_size``: its tokenizer's, bounding ``input_ids``)."""
        return ModelSpec(
            self.model_id,
            model_type,
            tuple(self.input_shape or ()),
            tuple(i.spec(vocabulary_size) for i in self.inputs or ()),
            tuple(sorted(self.max_dims.items())),
            text=self.tokenizer is not None,
            max_tokens=self.tokenizer.max_length if self.tokenizer else 0,
            bucketing=self.bucketing,
        )


class ModelsFile(BaseModel):
    """The whole models file."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ModelsFile:
        ids = [m.model_id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model_id used more than once: {', '.join(duplicates)}")
        return self


def check_sha256(value: str) -> str:
    """Return ``value`` if it is a sha256 as ``sha256sum`` prints it, else raise ValueError."""
    if not SHA256_PATTERN.fullmatch(value):
        raise ValueError(
            f"sha256 must be 64 lowercase hex characters (as sha256sum prints), got {value[:80]!r}"
        )
    return value


def load_models_file(path: Path) -> list[ModelConfig]:
    """Parse and validate a models file; raise ``ModelLoadError`` saying what is wrong."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"MODELS_CONFIG file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"MODELS_CONFIG file {path} is not valid TOML: {exc}") from None
    try:
        return ModelsFile.model_validate(data).models
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ModelLoadError(f"MODELS_CONFIG file {path} is invalid: {problems}") from None


def stub_config(model_id: str) -> ModelConfig:
    """The configuration of the built-in stub (served when there is no models file)."""
    return ModelConfig(
        model_id=model_id,
        model_type="classification",
        format="state_dict",
        architecture="stub",
        file=f"{model_id}.pt",
        input_shape=(128,),
        inputs=None,
        outputs=(),
        intra_op_threads=None,
        max_batch_size=None,
        batch_window_ms=None,
    )
