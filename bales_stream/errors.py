"""The service's error taxonomy.

::

    ServiceError
     +-- RequestRejected    a client error: the request gets an error reply, is acked, never retried
     |                      (.code is a public wire code: invalid_request, unknown_model, expired)
     +-- Unanswerable       an entry without a usable request_id: it goes to the dead-letter stream
     +-- ModelLoadError     a model file could not be loaded; the old model keeps serving
     |                      (.http_status says how the sidecar answers a reload)
     +-- StartupError       the service cannot start, for a reason the operator can fix
                            (EVENT_LOOP=uvloop without uvloop, the sidecar's port taken)

Server-side failures are not exceptions of this module: a batch that fails outside the
model is left pending and retried (see ``worker``); an unexpected failure on one entry while
it is admitted is answered with the ``internal`` code (see ``admission``).
"""

from __future__ import annotations

from bales_producer import wire


class ServiceError(Exception):
    """Base class of the service's own errors."""


class RequestRejected(ServiceError):
    """A request the service will not compute; its client gets an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def invalid(message: str) -> RequestRejected:
    """An ``invalid_request`` rejection."""
    return RequestRejected(wire.ERROR_INVALID_REQUEST, message)


class Unanswerable(ServiceError):
    """An entry that cannot be answered because it has no usable request_id."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelLoadError(ServiceError):
    """A model could not be (re)loaded; ``http_status`` is 400 for a bad request, else 500+."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class StartupError(ServiceError):
    """The service cannot start for a reason the operator can fix (the message says how)."""
