"""Model types: how a model's raw outputs become one result dict per request.

The contract a type implements (also for your own, plugged in by import path)::

    class MyType:
        name = "my_type"
        def __init__(self, **options): ...           # options from the model config
        def postprocess(self, outputs: torch.Tensor) -> list[dict]: ...
            # one dict per row of ``outputs`` (the model's first output): same length,
            # same order; values JSON-serialisable or numpy arrays

    class MyNamedType:                               # sees every output and the batch
        name = "my_named_type"
        takes_outputs = True
        def postprocess(self, outputs: tensors.ModelOutputs) -> list[dict]: ...

A numpy array in a result travels as a nested JSON array, or as a tensor of a safetensors
reply (``reply_encoding=safetensors``). Built in: ``classification`` (``label`` +
``confidence``, optional ``top_k``), ``regression`` (``values``), ``embedding``
(``embedding``, pooled over a sequence by ``pooling``, optionally L2-normalised),
``tensor`` (the named outputs as they are), ``text-classification`` (``label`` from
``labels`` + ``score``, optional ``top_k``), ``token-classification`` (a label and score
per real token).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np
import torch

from .errors import ModelLoadError
from .tensors import ModelOutputs


class ModelType(Protocol):
    """Turns a batch of model outputs into per-request results."""

    name: str

    def postprocess(self, outputs: Any) -> list[dict[str, Any]]:
        """One result dict per request: ``outputs`` is the first output tensor, or the
        ``ModelOutputs`` for a type with ``takes_outputs = True``."""
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
    """One vector per request: ``{"embedding": array}``. A sequence output ``(batch, seq,
    hidden)`` is pooled over the request's real positions (``pooling``: ``mean`` with the
    mask, or ``cls``: the first position); L2-normalised when ``normalize``."""

    name = "embedding"
    takes_outputs = True

    def __init__(
        self,
        normalize: bool = True,
        pooling: str | None = None,
        output: str | None = None,
        mask_input: str = "attention_mask",
    ) -> None:
        if pooling not in (None, "mean", "cls"):
            raise ModelLoadError(f"embedding option pooling must be mean or cls, got {pooling!r}")
        self.normalize = normalize
        self.pooling = pooling
        self.output = output
        self.mask_input = mask_input

    def postprocess(self, outputs: ModelOutputs) -> list[dict[str, Any]]:
        hidden = outputs.get(self.output).float()
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        elif self.pooling == "mean":
            mask = outputs.mask(self.mask_input)[:, : hidden.shape[1]].to(hidden.dtype)
            summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
            vectors = summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            vectors = hidden.reshape(hidden.shape[0], -1)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=1)
        return [{"embedding": row} for row in vectors.numpy()]


class TensorOutputs:
    """Every output (or those named in ``outputs``), per request, as it is:
    ``{"<output name>": array, ...}``."""

    name = "tensor"
    takes_outputs = True

    def __init__(self, outputs: list[str] | None = None) -> None:
        self.outputs = outputs

    def postprocess(self, outputs: ModelOutputs) -> list[dict[str, Any]]:
        names = self.outputs or list(outputs.tensors)
        columns = {name: outputs.rows(name) for name in names}
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


class TextClassification:
    """Softmax over the logits ``(batch, classes)``: ``{"label", "score"}`` with the label
    from ``labels`` (class index -> name), plus ``"top_k"`` with the option ``top_k``."""

    name = "text-classification"
    takes_outputs = True

    def __init__(
        self, labels: list[str], top_k: int | None = None, output: str | None = None
    ) -> None:
        if not labels or not all(isinstance(label, str) for label in labels):
            raise ModelLoadError("text-classification needs options.labels, a list of names")
        if top_k is not None and top_k < 1:
            raise ModelLoadError(f"text-classification option top_k must be >= 1, got {top_k}")
        self.labels = list(labels)
        self.top_k = top_k
        self.output = output

    def postprocess(self, outputs: ModelOutputs) -> list[dict[str, Any]]:
        probabilities = torch.softmax(self._logits(outputs), dim=-1)
        score, index = probabilities.max(dim=-1)
        results: list[dict[str, Any]] = [
            {"label": self.labels[i], "score": p}
            for i, p in zip(index.tolist(), score.tolist(), strict=True)
        ]
        if self.top_k:
            values, indices = probabilities.topk(min(self.top_k, len(self.labels)), dim=-1)
            for result, row_values, row_indices in zip(
                results, values.tolist(), indices.tolist(), strict=True
            ):
                result["top_k"] = [
                    {"label": self.labels[i], "score": p}
                    for i, p in zip(row_indices, row_values, strict=True)
                ]
        return results

    def _logits(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.get(self.output).float()
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ModelLoadError(
                f"text-classification expects logits (batch, {len(self.labels)}) for "
                f"{len(self.labels)} labels, got {list(logits.shape)}"
            )
        return logits


class TokenClassification:
    """A label per real token from logits ``(batch, seq, classes)``:
    ``{"labels": [...], "scores": array}`` (``labels``: class index -> name)."""

    name = "token-classification"
    takes_outputs = True

    def __init__(
        self, labels: list[str], output: str | None = None, mask_input: str = "attention_mask"
    ) -> None:
        if not labels:
            raise ModelLoadError("token-classification needs options.labels, a list of names")
        self.labels = list(labels)
        self.output = output
        self.mask_input = mask_input

    def postprocess(self, outputs: ModelOutputs) -> list[dict[str, Any]]:
        probabilities = torch.softmax(outputs.get(self.output).float(), dim=-1)
        if probabilities.ndim != 3 or probabilities.shape[2] != len(self.labels):
            raise ModelLoadError(
                f"token-classification expects logits (batch, seq, {len(self.labels)}), "
                f"got {list(probabilities.shape)}"
            )
        score, index = probabilities.max(dim=-1)
        lengths = outputs.mask(self.mask_input).sum(dim=1).tolist()
        return [
            {
                "labels": [self.labels[i] for i in index[row, :n].tolist()],
                "scores": np.ascontiguousarray(score[row, :n].numpy()),
            }
            for row, n in enumerate(lengths)
        ]


BUILT_IN: dict[str, type] = {
    "classification": Classification,
    "regression": Regression,
    "embedding": Embedding,
    "tensor": TensorOutputs,
    "text-classification": TextClassification,
    "token-classification": TokenClassification,
}


def make_model_type(name: str, options: dict[str, Any] | None = None) -> ModelType:
    """A built-in type by name, or a user type by import path ``package.module:Class``."""
    options = options or {}
    if name in BUILT_IN:
        factory: Any = BUILT_IN[name]
    elif ":" in name:
        factory = import_path(name)
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


def import_path(path: str, what: str = "model_type") -> Any:
    """The object at ``package.module:Name``; ``ModelLoadError`` when it cannot be imported."""
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"cannot import {what} {path!r}: {exc}") from None
