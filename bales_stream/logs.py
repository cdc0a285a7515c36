"""Logging set-up: one line per event, on stderr, as text or JSON (``LOG_FORMAT``).

Every record carries the consumer's name (``consumer``); events about a request or a batch
add ``request_id``, ``entry_id``, ``priority``, ``batch_id`` and ``traceparent`` through
``extra=``, which the JSON format emits as fields. Payloads are never logged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message")


def iso_time(record: logging.LogRecord) -> str:
    """A record's time in ISO 8601, UTC, to the millisecond: ``2026-12-02T14:40:00.123Z``."""
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _IsoTime:
    """Mixin: ``asctime`` as ``iso_time`` (the logging module's default has no zone)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record)


class _TextFormatter(_IsoTime, logging.Formatter):
    """``TEXT_FORMAT`` with ISO 8601 UTC times."""


class _JsonFormatter(_IsoTime, JsonFormatter):
    """One JSON object per line; ``time`` in ISO 8601 UTC."""


class _ConsumerField(logging.Filter):
    """Stamps every record with this process's consumer name."""

    def __init__(self, consumer: str) -> None:
        super().__init__()
        self.consumer = consumer

    def filter(self, record: logging.LogRecord) -> bool:
        record.consumer = self.consumer
        return True


def configure_logging(level: str, log_format: str = "text", consumer: str = "") -> None:
    """Configure the root logger at ``level``, as ``text`` or ``json`` lines on stderr."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(
            _JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    handler.addFilter(_ConsumerField(consumer))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
