"""Decoding request entries (wire format v1) into validated ``Request`` objects.

Every way an entry can be wrong maps to one clear rejection that says what was wrong and
what was expected; see docs/wire-format.md for the fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from bales_producer import wire

from .errors import RequestRejected, Unanswerable, invalid
from .inputs import Inputs, decode_inputs, read_reply_encoding
from .tensors import ModelSpec

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
        wire.FIELD_REPLY_ENCODING,
    )
)

_KEYS = {name: name.encode() for name in (n.decode() for n in KNOWN_FIELDS)}
"""Each field's name as the bytes key of an entry's fields (encoded once, not per lookup)."""

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
    inputs: dict[str, np.ndarray]
    """The model's named input arrays (empty for a text request until it is tokenised)."""
    enqueued_ms: int
    deadline_ms: int
    reply_to: str | None
    retried: bool = False
    """Delivered before (taken over after its consumer died or its model raised)."""
    traceparent: str | None = None
    shard: int = 0
    text: str | None = None
    """The text of an ``encoding=text`` request, tokenised with its batch."""
    reply_encoding: str = wire.ENCODING_JSON
    bucket: int = 0
    """Its length bucket (0: its model has no variable dimension, or does not bucket)."""
    read_ms: float = 0.0
    """When a consumer read it (Redis's clock): the end of its wait in Redis."""

    @property
    def batch_key(self) -> str:
        """Requests with the same key may share a batch: the model, and its length bucket."""
        return f"{self.model_id}#{self.bucket}" if self.bucket else self.model_id


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
    raw = fields.get(_KEYS[name])
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
    raw_id = (fields or {}).get(_KEYS[wire.FIELD_REQUEST_ID])
    if raw_id is None:
        size = (withheld or {}).get(_KEYS[wire.FIELD_REQUEST_ID])
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
    model_id = fields.get(_KEYS[wire.FIELD_MODEL_ID], b"").decode("utf-8", "replace")
    reply_to = fields.get(_KEYS[wire.FIELD_REPLY_TO], b"").decode("utf-8", "replace") or None
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
    if fields.get(_KEYS[wire.FIELD_REPLY_TO]) and envelope.reply_to is None:
        raise invalid("field reply_to must name an inbox key '<prefix>:inbox:<name>'")
    spec = _model_spec(envelope.model_id, fields, lookup)
    enqueued_ms = min(entry_time_ms(envelope.entry_id), int(now_ms))
    deadline_ms = enqueued_ms + _timeout_ms(fields, limits)
    reply_encoding = read_reply_encoding(_text(fields, wire.FIELD_REPLY_ENCODING))
    inputs = _inputs(fields, spec, limits)
    return Request(
        envelope.priority,
        envelope.entry_id,
        envelope.request_id,
        spec.model_id,
        inputs.tensors,
        enqueued_ms,
        deadline_ms,
        envelope.reply_to,
        traceparent=_traceparent(fields),
        shard=envelope.shard,
        text=inputs.text,
        reply_encoding=reply_encoding,
        bucket=inputs.bucket,
        read_ms=now_ms,
    )


def _refuse_withheld(withheld: dict[bytes, int], limits: Limits) -> None:
    """Refuse a request one of whose known fields was too large (or beyond the field
    count) to be read; withheld unknown fields are ignored, like every unknown field."""
    for name, size in withheld.items():
        if name == _KEYS[wire.FIELD_INPUT]:
            raise invalid(f"input has {size} bytes; the limit is {limits.max_input_bytes}")
        if name in KNOWN_FIELDS and name != _KEYS[wire.FIELD_TRACEPARENT]:  # that one: ignored
            raise invalid(
                f"field {name.decode()} has {size} bytes and was not read: fields other than "
                f"input hold at most {MAX_FIELD_BYTES} bytes, and an entry at most "
                f"{MAX_FIELDS} fields"
            )


TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
"""W3C trace context ``version-trace_id-parent_id-flags`` (all-zero ids are invalid)."""


def _traceparent(fields: dict[bytes, bytes]) -> str | None:
    """The entry's W3C traceparent, or None when absent or invalid (ignored, per W3C)."""
    raw = fields.get(_KEYS[wire.FIELD_TRACEPARENT])
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


def _inputs(fields: dict[bytes, bytes], spec: ModelSpec, limits: Limits) -> Inputs:
    raw = fields.get(_KEYS[wire.FIELD_INPUT])
    if raw is None:
        what = f"{spec.input_size} numbers" if not spec.named else "the model's input tensors"
        raise invalid(f"missing field input: expected {what}")
    if len(raw) > limits.max_input_bytes:
        raise invalid(f"input has {len(raw)} bytes; the limit is {limits.max_input_bytes}")
    encoding = _text(fields, wire.FIELD_ENCODING) or wire.ENCODING_JSON
    return decode_inputs(raw, encoding, spec)
