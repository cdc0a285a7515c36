"""bales-stream producer library: send inference requests to bales-stream over Redis Streams.

Imports without torch (and without numpy, unless you pass numpy arrays)::

    from bales_producer import Client, AsyncClient

    with Client("redis://localhost:6379/0") as client:
        reply = client.infer("stub_v1", [0.0] * 128, priority=0)

The clients (and with them redis-py) are imported on first use, so that code needing only
the wire contract or the errors (a health check, say) starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core import ClientCore
from .errors import (
    BalesError,
    DeadLettered,
    Expired,
    InternalError,
    InvalidOutput,
    InvalidRequest,
    Overloaded,
    ReplyError,
    RequestTimeout,
    UnknownModel,
)
from .wire import KeySpace

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client

_CLIENTS = {"AsyncClient": ".aio", "Client": ".client"}


def __getattr__(name: str) -> Any:
    """``Client`` and ``AsyncClient``, imported when first asked for (PEP 562)."""
    if name in _CLIENTS:
        return getattr(importlib.import_module(_CLIENTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "BalesError",
    "Client",
    "ClientCore",
    "DeadLettered",
    "Expired",
    "InternalError",
    "InvalidOutput",
    "InvalidRequest",
    "KeySpace",
    "Overloaded",
    "ReplyError",
    "RequestTimeout",
    "UnknownModel",
]
