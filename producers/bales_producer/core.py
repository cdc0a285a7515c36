"""The no-I/O core shared by the sync ``Client`` and the ``AsyncClient``.

It turns a call like ``infer("stub_v1", [0.1, ...], priority=1)`` into the stream key and
entry fields to XADD, and a reply document back into a result or a typed exception. The
two client shells only move bytes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import wire
from .errors import Overloaded, reply_error

"""URL schemes that name one node of a Redis Cluster, and the plain scheme redis-py takes."""

DEFAULT_TIMEOUT_S = 5.0
REPLY_GRACE_S = 1.0
"""How much longer than the request's own timeout a client waits for its reply."""


@dataclass(frozen=True)
class OutgoingRequest:
    """One request ready to XADD: where it goes and its entry fields."""

    request_id: str
    priority: int
    shard: int
    stream: str
    fields: dict[str, str | bytes]
    wait_s: float
    """How long the caller should wait for the reply before giving up."""


try:  # orjson parses replies ~6x faster than json; optional for the producer library
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    from json import loads as _loads  # type: ignore[assignment]


def new_request_id() -> str:
    """A fresh request id: 128 random bits as 32 hex chars. Unguessable on purpose: the
    first reply written to a reply key wins, so an id another client could predict would
    let it answer (or read) someone else's request (about 0.7 µs; a fork changes nothing)."""
    return os.urandom(16).hex()


def _is_array(value: Any) -> bool:
    """True for a numpy array (without importing numpy)."""
    return hasattr(value, "dtype") and hasattr(value, "astype")


def encode_input(values: Any) -> tuple[str, str | bytes]:
    """Encode an input as (encoding, payload).

    numpy arrays go as raw little-endian float32 (``f32``); lists and tuples as JSON. A dict
    of named inputs goes as a safetensors document when every value is a numpy array (each
    keeps its dtype; needs the ``safetensors`` package), else as a JSON object.
    """
    if _is_array(values):
        return wire.ENCODING_F32, values.astype("<f4", copy=False).tobytes(order="C")
    if isinstance(values, Mapping):
        return _encode_named(values)
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        return wire.ENCODING_JSON, json.dumps(values, separators=(",", ":"), allow_nan=False)
    raise TypeError(
        f"input must be a list, tuple, numpy array or dict of them, got {type(values).__name__}"
    )


def _encode_named(values: Mapping[str, Any]) -> tuple[str, str | bytes]:
    if values and all(_is_array(v) for v in values.values()):
        try:
            from safetensors.numpy import save
        except ImportError:
            pass  # JSON below: same values, as text
        else:
            return wire.ENCODING_SAFETENSORS, save({k: _contiguous(v) for k, v in values.items()})
    plain = {k: v.tolist() if _is_array(v) else v for k, v in values.items()}
    return wire.ENCODING_JSON, json.dumps(plain, separators=(",", ":"), allow_nan=False)


def _contiguous(array: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(array)


def decode_binary_reply(raw: bytes) -> dict[str, Any]:
    """A safetensors reply (``reply_encoding=safetensors``): the JSON document from its
    metadata, with the tensors (numpy arrays) put back into ``result``."""
    from safetensors.numpy import load

    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    document: dict[str, Any] = json.loads(header["__metadata__"][wire.REPLY_METADATA_KEY])
    document["result"].update(load(raw))
    return document


BACKLOG_CHECK_INTERVAL_S = 0.1
"""How long a measured backlog is trusted before it is measured again."""


class BacklogGate:
    """Admission control without I/O: remembers each request stream's measured backlog and
    refuses (``Overloaded``) while it is over ``limit``. The shells measure when ``stale()``
    says so. With shards, the limit applies to each shard's stream on its own."""

    def __init__(self, limit: int | None, interval_s: float = BACKLOG_CHECK_INTERVAL_S) -> None:
        self.limit = limit
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}

    def stale(self, stream: str) -> bool:
        """True when this stream's backlog should be measured before the next enqueue."""
        if self.limit is None:
            return False
        seen = self._seen.get(stream)
        return seen is None or time.monotonic() - seen[0] > self.interval_s

    def record(self, stream: str, backlog: int) -> None:
        """Store a fresh measurement."""
        self._seen[stream] = (time.monotonic(), backlog)

    def check(self, stream: str, priority: int) -> None:
        """Raise ``Overloaded`` if the last measured backlog is over the limit."""
        if self.limit is None or stream not in self._seen:
            return
        backlog = self._seen[stream][1]
        if backlog > self.limit:
            raise Overloaded(priority, backlog, self.limit)


def backlog_from_replies(length: object, groups: object, group: str) -> int:
    """A priority's backlog from the replies to ``XLEN`` and ``XINFO GROUPS`` (either may be
    an error, e.g. before the stream exists): the group's ``lag`` (entries not yet delivered
    to it), or the stream length when Redis cannot tell or the group does not exist yet."""
    fallback = length if isinstance(length, int) else 0
    for info in groups if isinstance(groups, list) else []:
        name = info.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            lag = info.get("lag")
            return int(lag) if lag is not None else fallback
    return fallback


def _payload(values: Any, text: str | None, reply_encoding: str | None) -> tuple[str, str | bytes]:
    """(encoding, input) of a request's values or text; checks the reply encoding asked for."""
    if reply_encoding is not None and reply_encoding not in wire.REPLY_ENCODINGS:
        raise ValueError(f"reply_encoding must be one of {', '.join(wire.REPLY_ENCODINGS)}")
    if (text is None) == (values is None):
        raise ValueError("give either values or text")
    if text is not None:
        return wire.ENCODING_TEXT, text.encode("utf-8")
    return encode_input(values)


class ClientCore:
    """Builds request entries and interprets replies for one key space."""

    def __init__(
        self,
        keys: wire.KeySpace | None = None,
        *,
        group: str = "bales",
        max_backlog: int | None = None,
        shards: int | None = 1,
    ) -> None:
        """``shards``: the fleet's shard count, or None to have the shell read it from
        ``keys.shard_count`` before the first send (``shards_known`` says which)."""
        self.keys = keys or wire.KeySpace()
        self.group = group
        self.gate = BacklogGate(max_backlog)
        self.shard_keys = [self.keys]
        self.shards_known = shards is not None
        if shards is not None:
            self.use_shards(shards)

    def use_shards(self, shards: int) -> None:
        """Spread requests over ``shards`` shards from now on."""
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.keys = replace(self.keys, shards=shards, shard=0)
        # each shard's key space, built once here rather than once per request
        self.shard_keys = [self.keys.for_shard(k) for k in range(shards)]
        self.shards_known = True

    def use_published_shards(self, published: bytes | str | None) -> None:
        """Take the shard count the fleet published (the value of ``keys.shard_count``;
        None or unreadable: 1)."""
        text = published.decode() if isinstance(published, bytes) else published
        self.use_shards(int(text) if text and text.isdigit() and int(text) >= 1 else 1)

    def build(
        self,
        model_id: str,
        values: Any = None,
        *,
        text: str | None = None,
        reply_encoding: str | None = None,
        priority: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        request_id: str | None = None,
        model_type: str | None = None,
        reply_to: str | None = None,
        traceparent: str | None = None,
    ) -> OutgoingRequest:
        """Validate the arguments and build the entry to XADD: ``values`` (an array, or a dict
        of named arrays) or ``text`` (for a model with a tokenizer). ``reply_encoding``:
        ``safetensors`` to get arrays back as numpy arrays, not JSON lists. ``traceparent``:
        the W3C trace context of the caller's current span, carried to the consumer's logs
        and spans."""
        request_id = request_id or new_request_id()
        if not wire.is_valid_request_id(request_id):
            raise ValueError(
                f"request_id {request_id!r} is invalid: expected 1-128 chars of [A-Za-z0-9._:-]"
            )
        if not model_id:
            raise ValueError("model_id must be a non-empty string")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        encoding, payload = _payload(values, text, reply_encoding)
        fields: dict[str, str | bytes] = {
            wire.FIELD_REQUEST_ID: request_id,
            wire.FIELD_MODEL_ID: model_id,
            wire.FIELD_INPUT: payload,
            wire.FIELD_ENCODING: encoding,
            wire.FIELD_TIMEOUT_MS: str(max(1, round(timeout_s * 1000))),
        }
        if model_type:
            fields[wire.FIELD_MODEL_TYPE] = model_type
        if reply_encoding:
            fields[wire.FIELD_REPLY_ENCODING] = reply_encoding
        if reply_to:
            fields[wire.FIELD_REPLY_TO] = reply_to
        if traceparent:
            fields[wire.FIELD_TRACEPARENT] = traceparent
        shard = self.keys.shard_of(request_id)
        stream = self.shard_keys[shard].stream(priority)
        return OutgoingRequest(
            request_id, priority, shard, stream, fields, timeout_s + REPLY_GRACE_S
        )

    def reply_key(self, request_id: str) -> str:
        """The reply LIST key of one request."""
        return self.keys.reply(request_id)

    @staticmethod
    def decode_reply(raw: bytes | str) -> dict[str, Any]:
        """Parse a reply document, JSON or safetensors (no status check)."""
        if isinstance(raw, bytes) and raw[:1] != b"{":
            return decode_binary_reply(raw)
        doc: dict[str, Any] = _loads(raw)
        return doc

    @staticmethod
    def check(reply: dict[str, Any]) -> dict[str, Any]:
        """Return an ok reply unchanged; raise the typed ``ReplyError`` for an error reply."""
        if reply.get("status") == wire.STATUS_OK:
            return reply
        raise reply_error(reply)
