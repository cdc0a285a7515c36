"""Reply documents (wire format v1) and the completion records that carry them to Redis.

A reply is a JSON document; numpy arrays in a result become nested JSON arrays. A request
with ``reply_encoding=safetensors`` that succeeded gets a safetensors document instead: its
arrays as tensors, and the JSON document (without them) in ``__metadata__["reply"]``. The
safetensors writer pads the header to a multiple of 8 bytes, so the first byte of such a
reply is never ``{``: a reader tells the two apart by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson
import safetensors.numpy
from bales_producer import wire

from .protocol import Envelope, Request


class Completion(NamedTuple):
    """Everything needed to answer and ack one stream entry in one step."""

    priority: int
    entry_id: str
    request_id: str
    document: bytes
    reply_to: str | None
    shard: int = 0


def _dump(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def _safetensors_document(document: dict[str, Any]) -> bytes:
    """The reply as a safetensors document: the result's arrays as tensors (named by their
    result keys), the rest of the reply as JSON in the metadata."""
    result = document["result"]
    tensors = {k: np.ascontiguousarray(v) for k, v in result.items() if isinstance(v, np.ndarray)}
    document = {**document, "result": {k: v for k, v in result.items() if k not in tensors}}
    document["tensors"] = sorted(tensors)
    metadata = {wire.REPLY_METADATA_KEY: orjson.dumps(document).decode()}
    return safetensors.numpy.save(tensors, metadata=metadata)


def ok_completions(
    computed: Sequence[tuple[Request, dict[str, Any]]],
    *,
    model_version: str,
    batch_size: int,
    queued_ms: Sequence[float],
    latency_ms: Sequence[float],
) -> list[Completion]:
    """The success replies of a batch's computed requests (with their results), in order;
    ``queued_ms`` and ``latency_ms`` per request, rounded to the microsecond."""
    completions = []
    for (request, result), queued, latency in zip(computed, queued_ms, latency_ms, strict=True):
        document = {
            "request_id": request.request_id,
            "model_id": request.model_id,
            "model_version": model_version,
            "status": wire.STATUS_OK,
            "result": result,
            "batch_size": batch_size,
            "queued_ms": queued,
            "latency_ms": latency,
            "priority": request.priority,
        }
        binary = request.reply_encoding == wire.ENCODING_SAFETENSORS
        completions.append(
            Completion(
                request.priority,
                request.entry_id,
                request.request_id,
                _safetensors_document(document) if binary else _dump(document),
                request.reply_to,
                request.shard,
            )
        )
    return completions


def error_completion(target: Envelope | Request, code: str, message: str) -> Completion:
    """The error reply of one request (``code`` is a wire error code)."""
    document = {
        "request_id": target.request_id,
        "model_id": target.model_id,
        "status": wire.STATUS_ERROR,
        "error": {"code": code, "message": message},
        "priority": target.priority,
    }
    return Completion(
        target.priority,
        target.entry_id,
        target.request_id,
        _dump(document),
        target.reply_to,
        target.shard,
    )


def expired_completion(request: Request, now_ms: float) -> Completion:
    """The ``expired`` reply of a request whose deadline passed before it was computed."""
    late_ms = now_ms - request.deadline_ms
    message = (
        f"deadline passed {late_ms:.0f} ms before the request could be computed "
        f"(timeout_ms was {request.deadline_ms - request.enqueued_ms})"
    )
    if request.retried:
        message += (
            "; an earlier delivery was not answered: the model raised on it, or the "
            "consumer holding it stopped"
        )
    return error_completion(request, wire.ERROR_EXPIRED, message)


@dataclass(frozen=True, slots=True)
class Completed:
    """What one completion call did besides answering: entries that were not ours any more
    (stale), and replies skipped because the reply key or the inbox holds another type."""

    stale: int = 0
    bad_reply_keys: int = 0
    bad_inboxes: int = 0

    def __add__(self, other: Completed) -> Completed:
        return Completed(
            self.stale + other.stale,
            self.bad_reply_keys + other.bad_reply_keys,
            self.bad_inboxes + other.bad_inboxes,
        )
