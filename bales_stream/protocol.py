"""Decoding request entries (wire format v1) into validated ``Request`` objects.

Every way an entry can be wrong maps to one clear rejection that says what was wrong and
what was expected; see docs/wire-format.md for the fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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


class Envelope(NamedTuple):
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


def _decoded(raw: bytes, name: str) -> str:
    """A field's value as text; ``invalid_request`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"field {name} is not valid UTF-8 text") from None


_REQUEST_ID = _KEYS[wire.FIELD_REQUEST_ID]
_MODEL_ID = _KEYS[wire.FIELD_MODEL_ID]
_REPLY_TO = _KEYS[wire.FIELD_REPLY_TO]
_INPUT = _KEYS[wire.FIELD_INPUT]
_ENCODING = _KEYS[wire.FIELD_ENCODING]
_MODEL_TYPE = _KEYS[wire.FIELD_MODEL_TYPE]
_TIMEOUT_MS = _KEYS[wire.FIELD_TIMEOUT_MS]
_TRACEPARENT = _KEYS[wire.FIELD_TRACEPARENT]
_REPLY_ENCODING = _KEYS[wire.FIELD_REPLY_ENCODING]
_VALID_ID = wire.REQUEST_ID_PATTERN.fullmatch


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
    raw_id = fields.get(_REQUEST_ID) if fields else None
    if raw_id is None:
        size = (withheld or {}).get(_REQUEST_ID)
        if size is not None:
            raise Unanswerable(
                f"field request_id ({size} bytes) was not read: it holds 1-128 chars, and only "
                f"the first {MAX_FIELDS} fields of an entry are read"
            )
        if not fields and not withheld:
            raise Unanswerable("entry has no fields (deleted from the stream?)")
        raise Unanswerable("missing field request_id")
    request_id = raw_id.decode("utf-8", "replace")
    if _VALID_ID(request_id) is None:
        raise Unanswerable(
            f"request_id {request_id[:140]!r} is invalid: expected 1-128 chars of [A-Za-z0-9._:-]"
        )
    assert fields is not None
    model_id = fields.get(_MODEL_ID, b"").decode("utf-8", "replace")
    raw_reply_to = fields.get(_REPLY_TO)
    reply_to = raw_reply_to.decode("utf-8", "replace") if raw_reply_to else None
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
    cannot make a request wait negative time or outlive its deadline. (On the hot path:
    each field is looked up once, with its name's bytes encoded once, at import.)"""
    if withheld:
        _refuse_withheld(withheld, limits)
    if envelope.reply_to is None and fields.get(_REPLY_TO):
        raise invalid("field reply_to must name an inbox key '<prefix>:inbox:<name>'")
    spec = _model_spec(envelope.model_id, fields, lookup)
    enqueued_ms = min(entry_time_ms(envelope.entry_id), int(now_ms))
    timeout = fields.get(_TIMEOUT_MS)
    deadline_ms = enqueued_ms + (limits.default_timeout_ms if not timeout else _timeout_ms(timeout))
    raw_encoding = fields.get(_REPLY_ENCODING)
    reply_encoding = (
        wire.ENCODING_JSON
        if raw_encoding is None
        else read_reply_encoding(_decoded(raw_encoding, wire.FIELD_REPLY_ENCODING))
    )
    inputs = _inputs(fields, spec, limits)
    traceparent = fields.get(_TRACEPARENT)
    return Request(
        envelope.priority,
        envelope.entry_id,
        envelope.request_id,
        spec.model_id,
        inputs.tensors,
        enqueued_ms,
        deadline_ms,
        envelope.reply_to,
        False,
        None if traceparent is None else _traceparent(traceparent),
        envelope.shard,
        inputs.text,
        reply_encoding,
        inputs.bucket,
        now_ms,
    )


def _refuse_withheld(withheld: dict[bytes, int], limits: Limits) -> None:
    """Refuse a request one of whose known fields was too large (or beyond the field
    count) to be read; withheld unknown fields are ignored, like every unknown field."""
    for name, size in withheld.items():
        if name == _INPUT:
            raise invalid(f"input has {size} bytes; the limit is {limits.max_input_bytes}")
        if name in KNOWN_FIELDS and name != _TRACEPARENT:  # that one: ignored
            raise invalid(
                f"field {name.decode()} has {size} bytes and was not read: fields other than "
                f"input hold at most {MAX_FIELD_BYTES} bytes, and an entry at most "
                f"{MAX_FIELDS} fields"
            )


TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
"""W3C trace context ``version-trace_id-parent_id-flags`` (all-zero ids are invalid)."""


def _traceparent(raw: bytes) -> str | None:
    """The entry's W3C traceparent, or None when invalid (ignored, per W3C)."""
    if len(raw) != 55:
        return None
    text = raw.decode("ascii", "replace")
    return text if TRACEPARENT.match(text) and not text.startswith("ff") else None


def _model_spec(model_id: str, fields: dict[bytes, bytes], lookup: ModelLookup) -> ModelSpec:
    if not model_id:
        raise invalid("missing field model_id: expected the id of a served model, e.g. stub_v1")
    spec = lookup(model_id)
    if spec is None:
        raise RequestRejected(wire.ERROR_UNKNOWN_MODEL, f"model {model_id!r} is not served")
    raw_type = fields.get(_MODEL_TYPE)
    model_type = _decoded(raw_type, wire.FIELD_MODEL_TYPE) if raw_type else None
    if model_type and model_type != spec.model_type:
        raise invalid(
            f"model_type {model_type!r} does not match: {model_id} is a {spec.model_type} model"
        )
    return spec


def _timeout_ms(raw: bytes) -> int:
    """A non-empty ``timeout_ms`` field's value."""
    text = _decoded(raw, wire.FIELD_TIMEOUT_MS)
    # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_TIMEOUT_MS):
        raise invalid(
            f"timeout_ms {text[:40]!r} is invalid: expected an integer from 1 to {MAX_TIMEOUT_MS}"
        )
    return int(text)


def _inputs(fields: dict[bytes, bytes], spec: ModelSpec, limits: Limits) -> Inputs:
    raw = fields.get(_INPUT)
    if raw is None:
        what = f"{spec.input_size} numbers" if not spec.named else "the model's input tensors"
        raise invalid(f"missing field input: expected {what}")
    if len(raw) > limits.max_input_bytes:
        raise invalid(f"input has {len(raw)} bytes; the limit is {limits.max_input_bytes}")
    encoding = fields.get(_ENCODING)
    text = _decoded(encoding, wire.FIELD_ENCODING) if encoding else wire.ENCODING_JSON
    return decode_inputs(raw, text, spec)
