"""Decoding request entries (wire format v1) into validated ``Request`` objects.

Every way an entry can be wrong maps to one clear rejection that says what was wrong and
what was expected; see docs/wire-format.md for the fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
from bales_producer import wire

from .errors import RequestRejected, Unanswerable, invalid

MAX_TIMEOUT_MS = 86_400_000
MAX_FIELD_BYTES = 4096
"""The largest value of any field but ``input`` (whose limit is ``MAX_INPUT_BYTES``)."""
MAX_FIELDS = 32
"""Fields of one entry read at most; the rest are withheld (unknown ones are ignored)."""
MAX_FIELD_NAME_BYTES = 64
"""The longest field name read; longer names are withheld."""
KNOWN_FIELDS = frozenset(
    name.encode()
    for name in (
        wire.FIELD_REQUEST_ID,
        wire.FIELD_MODEL_ID,
        wire.FIELD_INPUT,
        wire.FIELD_ENCODING,
        wire.FIELD_MODEL_TYPE,
        wire.FIELD_TIMEOUT_MS,
        wire.FIELD_REPLY_TO,
        wire.FIELD_TRACEPARENT,
    )
)
_F32 = np.dtype("<f4")
_JSON_KINDS = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_KINDS[type(None)] = "null"


@dataclass(frozen=True)
class ModelSpec:
    """What the decoder needs to know about a served model."""

    model_id: str
    model_type: str
    input_shape: tuple[int, ...]

    @property
    def input_size(self) -> int:
        """Number of float values in one input."""
        return math.prod(self.input_shape)


ModelLookup = Callable[[str], ModelSpec | None]


@dataclass(frozen=True)
class Limits:
    """Request limits taken from the settings."""

    default_timeout_ms: int
    max_input_bytes: int


@dataclass(slots=True)
class Request:
    """One accepted request, ready to be batched."""

    priority: int
    entry_id: str
    request_id: str
    model_id: str
    inputs: np.ndarray
    enqueued_ms: int
    deadline_ms: int
    reply_to: str | None
    retried: bool = False
    """Delivered before (taken over after its consumer died or its model raised)."""
    traceparent: str | None = None
    shard: int = 0


@dataclass(frozen=True)
class Envelope:
    """Where an answer to an entry goes; known as soon as the request_id is."""

    priority: int
    entry_id: str
    request_id: str
    model_id: str
    reply_to: str | None
    shard: int = 0


def entry_time_ms(entry_id: str) -> int:
    """The enqueue time (Redis clock, ms since the epoch) encoded in a stream entry ID."""
    return int(entry_id.split("-", 1)[0])


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"field {name} is not valid UTF-8 text") from None


def read_envelope(
    entry_id: str,
    fields: dict[bytes, bytes] | None,
    priority: int,
    keys: wire.KeySpace,
    shard: int = 0,
    withheld: dict[bytes, int] | None = None,
) -> Envelope:
    """Find where to answer an entry, or raise ``Unanswerable`` (dead-letter it).
    ``withheld``: fields too large to be read, name -> size in bytes (see ``scripts``)."""
    raw_id = (fields or {}).get(wire.FIELD_REQUEST_ID.encode())
    if raw_id is None:
        size = (withheld or {}).get(wire.FIELD_REQUEST_ID.encode())
        if size is not None:
            raise Unanswerable(
                f"field request_id ({size} bytes) was not read: it holds 1-128 chars, and only "
                f"the first {MAX_FIELDS} fields of an entry are read"
            )
        if not fields and not withheld:
            raise Unanswerable("entry has no fields (deleted from the stream?)")
        raise Unanswerable("missing field request_id")
    request_id = raw_id.decode("utf-8", "replace")
    if not wire.is_valid_request_id(request_id):
        raise Unanswerable(
            f"request_id {request_id[:140]!r} is invalid: expected 1-128 chars of [A-Za-z0-9._:-]"
        )
    assert fields is not None
    model_id = fields.get(wire.FIELD_MODEL_ID.encode(), b"").decode("utf-8", "replace")
    reply_to = fields.get(wire.FIELD_REPLY_TO.encode(), b"").decode("utf-8", "replace") or None
    if reply_to is not None and not keys.is_valid_inbox(reply_to):
        reply_to = None  # never write outside our key space; the reply key still gets it
    return Envelope(priority, entry_id, request_id, model_id[:200], reply_to, shard)


def decode_request(
    envelope: Envelope,
    fields: dict[bytes, bytes],
    lookup: ModelLookup,
    limits: Limits,
    now_ms: float,
    withheld: dict[bytes, int] | None = None,
) -> Request:
    """Validate an entry's fields against the model it names; raise ``RequestRejected``.

    The enqueue time is the entry ID's, but never later than ``now_ms`` (Redis's clock as
    the consumer reads the entry): an ID set ahead of the clock (XADD with an explicit ID)
    cannot make a request wait negative time or outlive its deadline."""
    if withheld:
        _refuse_withheld(withheld, limits)
    if fields.get(wire.FIELD_REPLY_TO.encode()) and envelope.reply_to is None:
        raise invalid("field reply_to must name an inbox key '<prefix>:inbox:<name>'")
    spec = _model_spec(envelope.model_id, fields, lookup)
    enqueued_ms = min(entry_time_ms(envelope.entry_id), int(now_ms))
    deadline_ms = enqueued_ms + _timeout_ms(fields, limits)
    inputs = _inputs(fields, spec, limits)
    return Request(
        envelope.priority,
        envelope.entry_id,
        envelope.request_id,
        spec.model_id,
        inputs,
        enqueued_ms,
        deadline_ms,
        envelope.reply_to,
        traceparent=_traceparent(fields),
        shard=envelope.shard,
    )


def _refuse_withheld(withheld: dict[bytes, int], limits: Limits) -> None:
    """Refuse a request one of whose known fields was too large (or beyond the field
    count) to be read; withheld unknown fields are ignored, like every unknown field."""
    for name, size in withheld.items():
        if name == wire.FIELD_INPUT.encode():
            raise invalid(f"input has {size} bytes; the limit is {limits.max_input_bytes}")
        if name in KNOWN_FIELDS and name != wire.FIELD_TRACEPARENT.encode():  # that one: ignored
            raise invalid(
                f"field {name.decode()} has {size} bytes and was not read: fields other than "
                f"input hold at most {MAX_FIELD_BYTES} bytes, and an entry at most "
                f"{MAX_FIELDS} fields"
            )


TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
"""W3C trace context ``version-trace_id-parent_id-flags`` (all-zero ids are invalid)."""


def _traceparent(fields: dict[bytes, bytes]) -> str | None:
    """The entry's W3C traceparent, or None when absent or invalid (ignored, per W3C)."""
    raw = fields.get(wire.FIELD_TRACEPARENT.encode())
    if raw is None or len(raw) != 55:
        return None
    text = raw.decode("ascii", "replace")
    return text if TRACEPARENT.match(text) and not text.startswith("ff") else None


def _model_spec(model_id: str, fields: dict[bytes, bytes], lookup: ModelLookup) -> ModelSpec:
    if not model_id:
        raise invalid("missing field model_id: expected the id of a served model, e.g. stub_v1")
    spec = lookup(model_id)
    if spec is None:
        raise RequestRejected(wire.ERROR_UNKNOWN_MODEL, f"model {model_id!r} is not served")
    model_type = _text(fields, wire.FIELD_MODEL_TYPE)
    if model_type and model_type != spec.model_type:
        raise invalid(
            f"model_type {model_type!r} does not match: {model_id} is a {spec.model_type} model"
        )
    return spec


def _timeout_ms(fields: dict[bytes, bytes], limits: Limits) -> int:
    text = _text(fields, wire.FIELD_TIMEOUT_MS)
    if text is None or text == "":
        return limits.default_timeout_ms
    # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_TIMEOUT_MS):
        raise invalid(
            f"timeout_ms {text[:40]!r} is invalid: expected an integer from 1 to {MAX_TIMEOUT_MS}"
        )
    return int(text)


def _inputs(fields: dict[bytes, bytes], spec: ModelSpec, limits: Limits) -> np.ndarray:
    raw = fields.get(wire.FIELD_INPUT.encode())
    if raw is None:
        raise invalid(f"missing field input: expected {spec.input_size} numbers")
    if len(raw) > limits.max_input_bytes:
        raise invalid(f"input has {len(raw)} bytes; the limit is {limits.max_input_bytes}")
    encoding = _text(fields, wire.FIELD_ENCODING) or wire.ENCODING_JSON
    if encoding == wire.ENCODING_F32:
        array = _f32_array(raw, spec)
    elif encoding == wire.ENCODING_JSON:
        array = _json_array(raw, spec)
    else:
        raise invalid(f"encoding {encoding[:40]!r} is not supported: expected json or f32")
    if not np.isfinite(array).all():
        raise invalid("input contains NaN or infinity (or a number beyond float32 range)")
    return array


def _f32_array(raw: bytes, spec: ModelSpec) -> np.ndarray:
    if len(raw) % 4:
        raise invalid(f"f32 input has {len(raw)} bytes: expected a multiple of 4")
    count = len(raw) // 4
    if count != spec.input_size:
        raise invalid(f"input has {count} values; {spec.model_id} expects {spec.input_size}")
    return np.frombuffer(raw, dtype=_F32).reshape(spec.input_shape)


def _json_array(raw: bytes, spec: ModelSpec) -> np.ndarray:
    # A rectangular array of n numbers has exactly n - 1 commas, whatever its nesting: more
    # commas cannot fit the model, and are refused before decoding (the decode runs on the
    # event loop, so its cost must not grow with MAX_INPUT_BYTES).
    commas = raw.count(b",")
    if commas >= spec.input_size:
        raise invalid(
            f"input has at least {commas + 1} values; {spec.model_id} expects {spec.input_size}"
        )
    try:
        value = orjson.loads(raw)  # strict JSON: NaN, Infinity and 1e400 are refused
    except orjson.JSONDecodeError as exc:
        raise invalid(
            f"input is not valid JSON ({exc}): expected a JSON array of numbers"
        ) from None
    if not isinstance(value, list):
        kind = _JSON_KINDS.get(type(value), "value")
        raise invalid(f"input is a JSON {kind}: expected an array of numbers")
    try:
        array = np.array(value)
    except (ValueError, OverflowError):
        raise invalid("input is a ragged array: expected a rectangular array of numbers") from None
    if array.dtype.kind not in "iuf":
        raise invalid("input holds non-numbers: expected an array of numbers only")
    if array.shape != spec.input_shape:
        raise invalid(_shape_message(array.shape, spec))
    with np.errstate(over="ignore"):
        return array.astype(_F32)


def _shape_message(shape: tuple[int, ...], spec: ModelSpec) -> str:
    if len(shape) == 1 and len(spec.input_shape) == 1:
        return f"input has {shape[0]} values; {spec.model_id} expects {spec.input_size}"
    return f"input has shape {list(shape)}; {spec.model_id} expects shape {list(spec.input_shape)}"
