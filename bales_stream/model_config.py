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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ModelLoadError

MODEL_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    model_type: str = "classification"
    format: Literal["torchscript", "export", "state_dict"]
    file: str = Field(min_length=1)
    input_shape: tuple[int, ...] = Field(min_length=1)
    input_dtype: Literal["float32"] = "float32"
    architecture: str | None = None
    sha256: str | None = None
    """The weights file's sha256 (64 lowercase hex): a file with another hash is refused."""
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    batch_window_ms: float | None = Field(None, ge=0, le=10_000)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None:
            check_sha256(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(size < 1 for size in self.input_shape):
            raise ValueError(f"input_shape sizes must be >= 1, got {list(self.input_shape)}")
        if self.format == "state_dict" and not self.architecture:
            raise ValueError("format state_dict needs an architecture (built in: stub)")
        return self


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
        max_batch_size=None,
        batch_window_ms=None,
    )
