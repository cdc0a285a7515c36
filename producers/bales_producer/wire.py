"""The bales-stream wire format, v1: every Redis key name and entry field in one place.

This module is the single source of truth for the public contract documented in
docs/wire-format.md. Both the service (``bales_stream``) and the producer library
import it; it does no I/O and needs neither torch nor numpy.

Keys (prefix ``bales`` and queue ``requests`` by default)::

    bales:{requests}:p0 .. p<N-1>   request streams, p0 = highest priority
    bales:{requests}:dead           dead-letter stream
    bales:reply:<request_id>        reply LIST holding one document, with a TTL
    bales:inbox:<name>              optional per-client reply inbox (field ``reply_to``)
    bales:{requests}:models         HASH: model_id -> the weights every consumer should serve
    bales:{requests}:control        pub/sub channel: "reload this model" to every consumer
    bales:{requests}:shards         STRING: the fleet's shard count (absent: 1)

With ``SHARDS=S`` > 1, shard k (0 <= k < S) has its own request and dead-letter streams,
``bales:{requests.k}:p0`` ... and ``bales:{requests.k}:dead``, each shard on its own hash
slot; a request goes to shard ``crc32(request_id) % S``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace

WIRE_VERSION = 1

# Entry fields of a request.
FIELD_REQUEST_ID = "request_id"
FIELD_MODEL_ID = "model_id"
FIELD_INPUT = "input"
FIELD_ENCODING = "encoding"
FIELD_MODEL_TYPE = "model_type"
FIELD_TIMEOUT_MS = "timeout_ms"
FIELD_REPLY_TO = "reply_to"
FIELD_TRACEPARENT = "traceparent"
FIELD_REPLY_ENCODING = "reply_encoding"

ENCODING_JSON = "json"
ENCODING_F32 = "f32"
ENCODING_SAFETENSORS = "safetensors"
ENCODING_TEXT = "text"
ENCODINGS = (ENCODING_JSON, ENCODING_F32, ENCODING_SAFETENSORS, ENCODING_TEXT)
REPLY_ENCODINGS = (ENCODING_JSON, ENCODING_SAFETENSORS)
"""``reply_encoding``: a JSON document (default), or a safetensors document whose
``__metadata__["reply"]`` holds the JSON document and whose tensors hold the result's arrays."""
REPLY_METADATA_KEY = "reply"

# Reply statuses and error codes.
STATUS_OK = "ok"
STATUS_ERROR = "error"
ERROR_INVALID_REQUEST = "invalid_request"
ERROR_UNKNOWN_MODEL = "unknown_model"
ERROR_EXPIRED = "expired"
ERROR_INTERNAL = "internal"
ERROR_DEAD_LETTER = "dead_letter"
ERROR_INVALID_OUTPUT = "invalid_output"
ERROR_CODES = (
    ERROR_INVALID_REQUEST,
    ERROR_UNKNOWN_MODEL,
    ERROR_EXPIRED,
    ERROR_INTERNAL,
    ERROR_DEAD_LETTER,
    ERROR_INVALID_OUTPUT,
)

REQUEST_ID_MAX_CHARS = 128
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""Allowed request ids (and inbox names): 1-128 chars of ``[A-Za-z0-9._:-]``."""

DEFAULT_PREFIX = "bales"
DEFAULT_QUEUE = "requests"
DEFAULT_PRIORITY_LEVELS = 3


def is_valid_request_id(value: str) -> bool:
    """True when ``value`` is a usable request id (1-128 chars of ``[A-Za-z0-9._:-]``)."""
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def shard_of(request_id: str, shards: int) -> int:
    """The shard a request goes to: CRC-32 (IEEE, as zlib) of its UTF-8 id, modulo
    ``shards``, so a retry with the same id lands on the same shard."""
    return zlib.crc32(request_id.encode()) % shards if shards > 1 else 0


@dataclass(frozen=True)
class KeySpace:
    """Names of every Redis key bales-stream uses, for one prefix and queue name, as seen
    from one shard (``shard``, of ``shards``; see ``for_shard``)."""

    prefix: str = DEFAULT_PREFIX
    queue: str = DEFAULT_QUEUE
    priority_levels: int = DEFAULT_PRIORITY_LEVELS
    shards: int = 1
    shard: int = 0

    def __post_init__(self) -> None:
        if self.priority_levels < 1:
            raise ValueError(f"priority_levels must be >= 1, got {self.priority_levels}")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard must be 0..{self.shards - 1}, got {self.shard}")

    def for_shard(self, shard: int) -> KeySpace:
        """The same key space, seen from shard ``shard`` (its streams and dead letters)."""
        return replace(self, shard=shard)

    def shard_of(self, request_id: str) -> int:
        """The shard a request with this id goes to (see ``shard_of``)."""
        return shard_of(request_id, self.shards)

    @property
    def hash_tag(self) -> str:
        """The Redis Cluster hash tag of this shard's streams: ``{requests}`` with one
        shard, else ``{requests.<shard>}``."""
        if self.shards == 1:
            return self.fleet_tag
        return "{" + f"{self.queue}.{self.shard}" + "}"

    @property
    def fleet_tag(self) -> str:
        """The hash tag of the keys every shard shares (models, control, shards)."""
        return "{" + self.queue + "}"

    def stream(self, priority: int) -> str:
        """The request stream of one priority level (0 is the highest)."""
        if not 0 <= priority < self.priority_levels:
            raise ValueError(
                f"priority must be 0..{self.priority_levels - 1} (0 is highest), got {priority}"
            )
        return f"{self.prefix}:{self.hash_tag}:p{priority}"

    @property
    def streams(self) -> list[str]:
        """All request streams, highest priority first."""
        return [self.stream(p) for p in range(self.priority_levels)]

    @property
    def dead_letter(self) -> str:
        """The dead-letter stream for entries that cannot be answered."""
        return f"{self.prefix}:{self.hash_tag}:dead"

    @property
    def desired_models(self) -> str:
        """HASH model_id -> JSON {"weights_path", "version"}: what the fleet should serve."""
        return f"{self.prefix}:{self.fleet_tag}:models"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel on which a reload is announced to every consumer."""
        return f"{self.prefix}:{self.fleet_tag}:control"

    @property
    def shard_count(self) -> str:
        """STRING: the fleet's shard count, set by every consumer at start; producers that
        are not told the count read it here (absent: 1)."""
        return f"{self.prefix}:{self.fleet_tag}:shards"

    def reply(self, request_id: str) -> str:
        """The reply LIST of one request."""
        return f"{self.prefix}:reply:{request_id}"

    def inbox(self, name: str) -> str:
        """A client's reply inbox LIST (used through the ``reply_to`` field)."""
        return f"{self.prefix}:inbox:{name}"

    @property
    def inbox_prefix(self) -> str:
        """What every valid ``reply_to`` value starts with."""
        return f"{self.prefix}:inbox:"

    def is_valid_inbox(self, key: str) -> bool:
        """True when ``key`` names an inbox of this key space with a valid name."""
        prefix = self.inbox_prefix
        return key.startswith(prefix) and is_valid_request_id(key[len(prefix) :])


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name one node of a Redis Cluster, and the scheme redis-py takes."""


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` (or ``rediss+cluster://``) URL."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """The URL redis-py takes: ``redis+cluster://h:p`` becomes ``redis://h:p``."""
    scheme, sep, rest = url.partition("://")
    return CLUSTER_SCHEMES.get(scheme.lower(), scheme) + sep + rest
