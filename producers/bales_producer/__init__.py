"""bales-stream producer library: send inference requests to bales-stream over Redis Streams.

Imports without torch (and without numpy, unless you pass numpy arrays)::

    from bales_producer import Client, AsyncClient

    with Client("redis://localhost:6379/0") as client:
        reply = client.infer("stub_v1", [0.0] * 128, priority=0)
"""

from .aio import AsyncClient
from .client import Client
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
