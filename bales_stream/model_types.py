"""Model types: how a model's raw output tensor becomes one result dict per request.

The contract a type implements (also for your own, plugged in by import path)::

    class MyType:
        name = "my_type"
        def __init__(self, **options): ...           # options from the model config
        def postprocess(self, outputs: torch.Tensor) -> list[dict]: ...
            # one JSON-serialisable dict per row of ``outputs``: same length, same order

Built in: ``classification`` (``label`` + ``confidence``, optional ``top_k``),
``regression`` (``values``: a vector of floats), ``embedding`` (``embedding``: a float
vector, optionally L2-normalised).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch

from .errors import ModelLoadError


class ModelType(Protocol):
    """Turns a batch of model outputs into per-request results."""

    name: str

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """One result dict per row of ``outputs``."""
        ...


class Classification:
    """Softmax over the last dimension: ``{"label", "confidence"}`` (+ ``"top_k"``)."""

    name = "classification"

    def __init__(self, top_k: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise ModelLoadError(f"classification option top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        probabilities = torch.softmax(outputs, dim=-1)
        confidence, label = probabilities.max(dim=-1)
        results = [
            {"label": lab, "confidence": conf}
            for lab, conf in zip(label.tolist(), confidence.tolist(), strict=True)
        ]
        if self.top_k:
            k = min(self.top_k, probabilities.shape[-1])
            top_values, top_labels = probabilities.topk(k, dim=-1)
            for result, values, labels in zip(
                results, top_values.tolist(), top_labels.tolist(), strict=True
            ):
                result["top_k"] = [
                    {"label": lab, "confidence": val}
                    for lab, val in zip(labels, values, strict=True)
                ]
        return results


class Regression:
    """The raw output row as floats: ``{"values": [...]}``."""

    name = "regression"

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        rows = outputs.reshape(outputs.shape[0], -1).tolist()
        return [{"values": row} for row in rows]


class Embedding:
    """The output row as a vector, L2-normalised when ``normalize``: ``{"embedding": [...]}``."""

    name = "embedding"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        vectors = outputs.reshape(outputs.shape[0], -1)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=1)
        return [{"embedding": row} for row in vectors.tolist()]


BUILT_IN: dict[str, type] = {
    "classification": Classification,
    "regression": Regression,
    "embedding": Embedding,
}


def make_model_type(name: str, options: dict[str, Any] | None = None) -> ModelType:
    """A built-in type by name, or a user type by import path ``package.module:Class``."""
    options = options or {}
    if name in BUILT_IN:
        factory: Any = BUILT_IN[name]
    elif ":" in name:
        factory = _import(name)
    else:
        known = ", ".join(sorted(BUILT_IN))
        raise ModelLoadError(
            f"model_type {name!r} is unknown: expected one of {known} or 'package.module:Class'"
        )
    try:
        model_type: ModelType = factory(**options)
    except TypeError as exc:
        raise ModelLoadError(
            f"model_type {name!r} does not take options {options}: {exc}"
        ) from None
    if not callable(getattr(model_type, "postprocess", None)):
        raise ModelLoadError(f"model_type {name!r} has no postprocess(outputs) method")
    return model_type


def _import(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import model_type {path!r}: {exc}") from None
