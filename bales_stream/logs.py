"""Logging set-up: one line per event, on stderr."""

from __future__ import annotations

import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Configure the root logger at ``level`` (debug, info, warning, error, critical)."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT, force=True)
