"""The no-I/O core shared by the sync ``Client`` and the ``AsyncClient``.

It turns a call like ``infer("stub_v1", [0.1, ...], priority=1)`` into the stream key and
entry fields to XADD, and a reply document back into a result or a typed exception. The
two client shells only move bytes.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import wire
from .errors import reply_error

DEFAULT_TIMEOUT_S = 5.0
REPLY_GRACE_S = 1.0
"""How much longer than the request's own timeout a client waits for its reply."""


@dataclass(frozen=True)
class OutgoingRequest:
    """One request ready to XADD: where it goes and its entry fields."""

    request_id: str
    stream: str
    fields: dict[str, str | bytes]
    wait_s: float
    """How long the caller should wait for the reply before giving up."""


def new_request_id() -> str:
    """A fresh random request id (32 hex chars)."""
    return uuid.uuid4().hex


def encode_input(values: Any) -> tuple[str, str | bytes]:
    """Encode an input as (encoding, payload).

    numpy arrays go as raw little-endian float32 (``f32``); lists and tuples as JSON.
    """
    if hasattr(values, "dtype") and hasattr(values, "astype"):  # numpy array, no import needed
        return wire.ENCODING_F32, values.astype("<f4", copy=False).tobytes(order="C")
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        return wire.ENCODING_JSON, json.dumps(values, separators=(",", ":"), allow_nan=False)
    raise TypeError(f"input must be a list, tuple or numpy array, got {type(values).__name__}")


class ClientCore:
    """Builds request entries and interprets replies for one key space."""

    def __init__(self, keys: wire.KeySpace | None = None) -> None:
        self.keys = keys or wire.KeySpace()

    def build(
        self,
        model_id: str,
        values: Any,
        *,
        priority: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        request_id: str | None = None,
        model_type: str | None = None,
        reply_to: str | None = None,
    ) -> OutgoingRequest:
        """Validate the arguments and build the entry to XADD."""
        request_id = request_id or new_request_id()
        if not wire.is_valid_request_id(request_id):
            raise ValueError(
                f"request_id {request_id!r} is invalid: expected 1-128 chars of [A-Za-z0-9._:-]"
            )
        if not model_id:
            raise ValueError("model_id must be a non-empty string")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        encoding, payload = encode_input(values)
        fields: dict[str, str | bytes] = {
            wire.FIELD_REQUEST_ID: request_id,
            wire.FIELD_MODEL_ID: model_id,
            wire.FIELD_INPUT: payload,
            wire.FIELD_ENCODING: encoding,
            wire.FIELD_TIMEOUT_MS: str(max(1, round(timeout_s * 1000))),
        }
        if model_type:
            fields[wire.FIELD_MODEL_TYPE] = model_type
        if reply_to:
            fields[wire.FIELD_REPLY_TO] = reply_to
        return OutgoingRequest(
            request_id, self.keys.stream(priority), fields, timeout_s + REPLY_GRACE_S
        )

    def reply_key(self, request_id: str) -> str:
        """The reply LIST key of one request."""
        return self.keys.reply(request_id)

    @staticmethod
    def decode_reply(raw: bytes | str) -> dict[str, Any]:
        """Parse a reply document (no status check)."""
        doc: dict[str, Any] = json.loads(raw)
        return doc

    @staticmethod
    def check(reply: dict[str, Any]) -> dict[str, Any]:
        """Return an ok reply unchanged; raise the typed ``ReplyError`` for an error reply."""
        if reply.get("status") == wire.STATUS_OK:
            return reply
        raise reply_error(reply)
