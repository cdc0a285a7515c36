"""Decoding a request's ``input`` field, in its ``encoding``, into the model's named arrays.

- ``json``: a JSON array (the model's single input, e.g. ``[[1, 2], [3, 4]]``) or a JSON
  object of named arrays (``{"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1]}``),
  cast to the declared dtypes: a fraction for an integer input, an integer out of its dtype's
  range, a number beyond a float dtype's range are refused.
- ``f32``: raw little-endian float32 values of a model's single fixed-shape float32 input.
- ``safetensors``: a safetensors document of named tensors, each exactly of its declared
  dtype and shape (no batch dimension).
- ``text``: UTF-8 text for a model with a tokenizer; tokenised with its batch, in the executor.

Every refusal is a ``RequestRejected`` (``invalid_request``) that names the tensor and says
what was expected. See docs/wire-format.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import orjson
import safetensors
from bales_producer import wire

from .errors import RequestRejected, invalid
from .tensors import (
    SAFETENSORS_DTYPES,
    ModelSpec,
    TensorMismatch,
    TensorSpec,
    bucket_of,
    check_tensors,
)

_F32 = np.dtype("<f4")
_JSON_KINDS = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_KINDS[type(None)] = "null"
_WIRE_DTYPES = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "uint8": "u1",
    "bool": "?",
}


@dataclass(slots=True)
class Inputs:
    """One request's decoded input: named arrays, or text for the model's tokenizer."""

    tensors: dict[str, np.ndarray]
    text: str | None = None
    bucket: int = 0
    """The length bucket (0: the model has no variable dimension or does not bucket)."""


def decode_inputs(raw: bytes, encoding: str, spec: ModelSpec) -> Inputs:
    """Decode ``raw`` in ``encoding`` for the model ``spec``; raise ``RequestRejected``."""
    if encoding == wire.ENCODING_TEXT:
        return _text(raw, spec)
    if encoding == wire.ENCODING_F32:
        tensors = {spec.inputs[0].name: _f32_array(raw, spec)}
    elif encoding == wire.ENCODING_JSON:
        tensors = _json_tensors(raw, spec)
    elif encoding == wire.ENCODING_SAFETENSORS:
        tensors = _safetensors(raw, spec)
    else:
        raise invalid(
            f"encoding {encoding[:40]!r} is not supported: expected one of "
            + ", ".join(wire.ENCODINGS)
        )
    if not spec.named and encoding != wire.ENCODING_SAFETENSORS:
        return Inputs(tensors)  # its one array's shape was checked as it was decoded
    try:
        sizes = check_tensors(spec, tensors)
    except TensorMismatch as exc:
        raise invalid(str(exc)) from None
    bucket = bucket_of(max(sizes.values())) if sizes and spec.bucketing else 0
    return Inputs(tensors, bucket=bucket)


def _text(raw: bytes, spec: ModelSpec) -> Inputs:
    if not spec.text:
        raise invalid(
            f"{spec.model_id} does not take text (it declares no tokenizer): expected "
            + _expected(spec)
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("text input is not valid UTF-8") from None
    # about 4 bytes of text per token (a cheap length estimate for bucketing), and never
    # more than the tokenizer keeps: long texts all share the longest bucket
    tokens = min(len(raw) // 4 + 2, spec.max_tokens or len(raw))
    return Inputs({}, text, bucket_of(tokens) if spec.bucketing else 0)


def _expected(spec: ModelSpec) -> str:
    if not spec.named:
        return f"{spec.input_size} numbers"
    return "tensors " + ", ".join(s.describe() for s in spec.inputs)


def _f32_array(raw: bytes, spec: ModelSpec) -> np.ndarray:
    only = spec.inputs[0]
    if not spec.single_float32:
        raise invalid(
            f"encoding f32 is for a model with one fixed-shape float32 input; {spec.model_id} "
            f"expects {_expected(spec)} (use json or safetensors)"
        )
    if len(raw) % 4:
        raise invalid(f"f32 input has {len(raw)} bytes: expected a multiple of 4")
    count = len(raw) // 4
    size = spec.input_size
    if count != size:
        raise invalid(f"input has {count} values; {spec.model_id} expects {size}")
    array = np.frombuffer(raw, dtype=_F32)
    if len(only.shape) != 1:
        array = array.reshape(only.shape)  # type: ignore[arg-type]
    _check_finite(only, array)
    return array


def _json_tensors(raw: bytes, spec: ModelSpec) -> dict[str, np.ndarray]:
    # A rectangular array of n numbers has n - 1 commas whatever its nesting (an object of
    # k arrays: k - 1 more): more commas than the model can take are refused before the
    # decode (it runs on the event loop, so its cost must not grow with MAX_INPUT_BYTES).
    most = spec.max_values()
    commas = raw.count(b",")
    if most is not None and commas >= most + len(spec.inputs) - 1:
        if not spec.named:
            raise invalid(f"input has at least {commas + 1} values; {spec.model_id} expects {most}")
        bounds = ", ".join(f"{name} <= {size}" for name, size in spec.max_dims)
        raise invalid(
            f"input has {commas} commas: more than {spec.model_id} takes ({most} values at "
            f"most in {_json_expected(spec)}{'; ' + bounds if bounds else ''})"
        )
    try:
        value = orjson.loads(raw)  # strict JSON: NaN, Infinity and 1e400 are refused
    except orjson.JSONDecodeError as exc:
        raise invalid(f"input is not valid JSON ({exc}): expected {_json_expected(spec)}") from None
    if isinstance(value, dict) and spec.named:
        unknown = next((name for name in value if name not in spec.input_names), None)
        if unknown is not None:  # before any array is built
            return {str(unknown)[:64]: np.zeros(0)}  # refused by check_tensors, naming it
        return {name: _json_array(spec, name, item) for name, item in value.items()}
    if not isinstance(value, list):
        kind = _JSON_KINDS.get(type(value), "value")
        raise invalid(f"input is a JSON {kind}: expected {_json_expected(spec)}")
    if len(spec.inputs) != 1:
        raise invalid(f"{spec.model_id} has several inputs: expected {_json_expected(spec)}")
    return {spec.inputs[0].name: _json_array(spec, spec.inputs[0].name, value)}


def _json_expected(spec: ModelSpec) -> str:
    if not spec.named:
        return "an array of numbers"
    names = ", ".join(s.describe() for s in spec.inputs)
    return f"a JSON object of named arrays ({names})"


def _json_array(spec: ModelSpec, name: str, value: object) -> np.ndarray:
    declared = {s.name: s for s in spec.inputs}.get(name)
    if declared is None:
        return np.zeros(0)  # refused by check_tensors, which names it and the inputs
    label = "input" if not spec.named else f"tensor {name}"
    if not isinstance(value, list):
        raise invalid(
            f"{label} is a JSON {_JSON_KINDS.get(type(value), 'value')}: expected an array"
        )
    try:
        array = np.array(value)
    except (ValueError, OverflowError):
        raise invalid(
            f"{label} is a ragged array: expected a rectangular array of numbers"
        ) from None
    if array.dtype.kind not in "biuf" or (array.dtype.kind == "b" and not spec.named):
        raise invalid(f"{label} holds non-numbers: expected an array of numbers only")
    if not spec.named and array.shape != declared.shape:
        raise invalid(_shape_message(array.shape, spec))
    return _cast(label, declared, array)


def _cast(label: str, declared: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` (from JSON) as the declared dtype, refusing values that do not fit it."""
    kind = declared.storage.kind
    if kind == "f":  # true/false count as 1/0, as they do for integer inputs
        with np.errstate(over="ignore"):
            cast = array.astype(declared.storage)
        if declared.dtype == "bfloat16":
            cast = _round_to_bfloat16(cast)
        _check_finite(declared, cast)
        return cast
    if array.dtype.kind == "f" and not np.array_equal(array, np.floor(array)):
        raise invalid(f"{label} holds fractions: expected {declared.dtype} integers")
    if kind == "b":
        if array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
            raise invalid(f"{label} holds values other than true/false (or 0/1)")
        return array.astype(bool)
    info = np.iinfo(declared.storage)
    # floats (JSON 1e3, or integers numpy could not hold as int64) compare against the
    # exact bounds: float(2**63 - 1) rounds up to 2**63
    if array.dtype.kind == "f":
        too_large = bool(array.size) and array.max() >= float(info.max) + 1
    else:
        too_large = bool(array.size) and int(array.max()) > info.max
    if too_large or (array.size and int(array.min()) < info.min):
        raise invalid(f"{label} holds integers out of {declared.dtype} range")
    return array.astype(declared.storage)


def _round_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) to bfloat16's, as float32: a value beyond
    bfloat16's range becomes infinite here, where it is refused, not in the model."""
    bits = array.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def _check_finite(declared: TensorSpec, array: np.ndarray) -> None:
    if declared.storage.kind == "f" and not np.isfinite(array).all():
        what = "input" if declared.name == "input" else f"tensor {declared.name}"
        raise invalid(
            f"{what} contains NaN or infinity (or a number beyond {declared.dtype} range)"
        )


def _shape_message(shape: tuple[int, ...], spec: ModelSpec) -> str:
    if len(shape) == 1 and len(spec.input_shape) == 1:
        return f"input has {shape[0]} values; {spec.model_id} expects {spec.input_size}"
    return f"input has shape {list(shape)}; {spec.model_id} expects shape {list(spec.input_shape)}"


def _safetensors(raw: bytes, spec: ModelSpec) -> dict[str, np.ndarray]:
    try:
        document = safetensors.deserialize(raw)
    except Exception as exc:  # SafetensorError, or a header that is not the format's JSON
        raise invalid(
            f"input is not a safetensors document ({str(exc)[:120]}): expected " + _expected(spec)
        ) from None
    declared = {s.name: s for s in spec.inputs}
    tensors = {}
    for name, view in document:
        input_spec = declared.get(name)
        if input_spec is not None:
            tensors[name] = _from_view(input_spec, view)
        else:
            tensors[name[:64]] = np.zeros(0)  # refused by check_tensors, naming it
    return tensors


def _from_view(declared: TensorSpec, view: Mapping[str, object]) -> np.ndarray:
    dtype = SAFETENSORS_DTYPES.get(str(view["dtype"]))
    shape = tuple(int(n) for n in view["shape"])  # type: ignore[attr-defined]
    if dtype != declared.dtype:
        raise invalid(
            f"tensor {declared.name} is {view['dtype']}: expected {declared.describe()} "
            f"(safetensors dtype {_code(declared.dtype)})"
        )
    array = np.frombuffer(view["data"], dtype=_WIRE_DTYPES[dtype]).reshape(shape)  # type: ignore[call-overload]
    if dtype == "bfloat16":  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif array.dtype.byteorder == ">" or not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    _check_finite(declared, array)
    return array


def _code(dtype: str) -> str:
    return next(code for code, name in SAFETENSORS_DTYPES.items() if name == dtype)


def read_reply_encoding(text: str | None) -> str:
    """The reply encoding a request asks for (``json`` when absent); refuses others."""
    if text is None or text == "":
        return wire.ENCODING_JSON
    if text not in wire.REPLY_ENCODINGS:
        raise RequestRejected(
            wire.ERROR_INVALID_REQUEST,
            f"reply_encoding {text[:40]!r} is not supported: expected "
            + " or ".join(wire.REPLY_ENCODINGS),
        )
    return text
