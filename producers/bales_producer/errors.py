"""Exceptions raised by the producer library.

::

    BalesError
     +-- ReplyError            the service answered with status "error" (has .code, .message)
     |    +-- InvalidRequest   code "invalid_request": the request was malformed
     |    +-- UnknownModel     code "unknown_model": no such model is served
     |    +-- Expired          code "expired": the deadline passed before it was computed
     |    +-- InternalError    code "internal": the service failed to compute it
     |    +-- DeadLettered     code "dead_letter": it failed MAX_DELIVERIES times; given up
     |    +-- InvalidOutput    code "invalid_output": the model's output was not finite
     +-- RequestTimeout        no reply arrived in time (also a TimeoutError)
     +-- Overloaded            refused before enqueueing: that priority's backlog is over the bound
"""

from __future__ import annotations

from typing import Any

from . import wire


class BalesError(Exception):
    """Base class of every error raised by the producer library."""


class ReplyError(BalesError):
    """The service replied with an error; ``code`` is one of the wire error codes."""

    code: str = ""

    def __init__(self, code: str, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply or {}


class InvalidRequest(ReplyError):
    """The request was malformed (bad input, wrong shape, bad field)."""


class UnknownModel(ReplyError):
    """The request named a model the service does not serve."""


class Expired(ReplyError):
    """The request's deadline passed before the service computed it."""


class InternalError(ReplyError):
    """The service failed while computing the request."""


class DeadLettered(ReplyError):
    """The request failed on every delivery and was moved to the dead-letter stream."""


class InvalidOutput(ReplyError):
    """The model's output for this input was not finite (NaN or infinity); retrying the
    same input gives the same result."""


class RequestTimeout(BalesError, TimeoutError):
    """No reply arrived within the time the caller was willing to wait."""


class Overloaded(BalesError):
    """The request was not enqueued: its priority level's backlog exceeds ``max_backlog``."""

    def __init__(self, priority: int, backlog: int, limit: int) -> None:
        super().__init__(
            f"priority {priority} has {backlog} requests waiting (limit {limit}); not enqueued"
        )
        self.priority = priority
        self.backlog = backlog
        self.limit = limit


_BY_CODE: dict[str, type[ReplyError]] = {
    wire.ERROR_INVALID_REQUEST: InvalidRequest,
    wire.ERROR_UNKNOWN_MODEL: UnknownModel,
    wire.ERROR_EXPIRED: Expired,
    wire.ERROR_INTERNAL: InternalError,
    wire.ERROR_DEAD_LETTER: DeadLettered,
    wire.ERROR_INVALID_OUTPUT: InvalidOutput,
}


def reply_error(reply: dict[str, Any]) -> ReplyError:
    """Build the typed exception for an error reply document."""
    error = reply.get("error") or {}
    code = str(error.get("code", "unknown"))
    return _BY_CODE.get(code, ReplyError)(code, str(error.get("message", "")), reply)
