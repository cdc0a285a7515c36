"""The model registry: which models are served, and atomic hot-swap on reload.

A swap replaces one dict entry (a reference to an immutable ``LoadedModel``), so a batch
that already took its model keeps running wholly on the old version while the next batch
gets the new one. Loading and warm-up run in the executor; the old model serves until
the new one is ready, and stays if loading fails.

A model pinned in the models file (``sha256``) only ever loads a file with that hash, at
start-up and on every reload, unless the reload names another hash (an admin's reload
request may; the fleet record carries it to every consumer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .metrics import UNKNOWN_LABEL
from .model_config import ModelConfig, stub_config
from .models import LoadedModel, builtin_stub, load_model
from .tensors import ModelSpec

log = logging.getLogger(__name__)

RunBlocking = Callable[..., Awaitable[Any]]
"""``await run_blocking(fn, *args)`` runs ``fn`` in the worker's executor."""


def confine(weights_dir: Path, raw_path: str) -> Path:
    """Resolve ``raw_path`` (after symlinks) and insist it is a file inside ``weights_dir``.

    A relative path is tried against ``weights_dir`` first, then the working directory
    (so both ``stub_v2.pt`` and ``./weights/stub_v2.pt`` work). Raises ``ModelLoadError``.
    """
    if not raw_path or "\x00" in raw_path:
        raise ModelLoadError("weights_path must be a non-empty path")
    root = weights_dir.resolve()
    given = Path(raw_path)
    candidates = [given] if given.is_absolute() else [root / given, Path.cwd() / given]
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved.is_relative_to(root) and resolved.is_file():
            return resolved
    if any(c.resolve().is_relative_to(root) for c in candidates):
        raise ModelLoadError(f"weights file {raw_path!r} does not exist in WEIGHTS_DIR", 404)
    raise ModelLoadError(f"weights_path {raw_path!r} is outside WEIGHTS_DIR ({weights_dir})")


class ModelRegistry:
    """The models one consumer serves, by model_id."""

    def __init__(self, weights_dir: Path, run_blocking: RunBlocking) -> None:
        self.weights_dir = weights_dir
        self._run_blocking = run_blocking
        self._models: dict[str, LoadedModel] = {}
        self._configs: dict[str, ModelConfig] = {}
        self._reload_locks: dict[str, asyncio.Lock] = {}

    def get(self, model_id: str) -> LoadedModel | None:
        """The current version of a model, or None if it is not served."""
        return self._models.get(model_id)

    def metric_label(self, model_id: str) -> str:
        """``model_id`` as a metric label value: a served model's id, else ``_unknown``
        (request-supplied text must never grow the number of series)."""
        return model_id if model_id in self._models else UNKNOWN_LABEL

    def spec(self, model_id: str) -> ModelSpec | None:
        """The input spec of a served model (the decoder's model lookup)."""
        model = self._models.get(model_id)
        return model.spec if model else None

    @property
    def count(self) -> int:
        """How many models are served."""
        return len(self._models)

    def models(self) -> dict[str, LoadedModel]:
        """A snapshot of every served model, by model_id."""
        return dict(self._models)

    def configs(self) -> dict[str, ModelConfig]:
        """The configuration of every served model, by model_id."""
        return dict(self._configs)

    async def load_all(self, configs: list[ModelConfig]) -> None:
        """Load (and warm up) every configured model; raise ``ModelLoadError`` naming the
        first that fails, so a consumer never starts half-configured."""
        for config in configs:
            path = confine(self.weights_dir, config.file)
            self._models[config.model_id] = await self._run_blocking(
                load_model, config, path, None, self._tokenizer_path(config)
            )
            self._configs[config.model_id] = config
            log.info(
                "serving %s (%s) version %s",
                config.model_id,
                config.model_type,
                self._models[config.model_id].version,
            )

    def _tokenizer_path(self, config: ModelConfig) -> Path | None:
        """The model's tokenizer file, confined to WEIGHTS_DIR (None: it has none)."""
        return confine(self.weights_dir, config.tokenizer.file) if config.tokenizer else None

    async def load_default(self, model_id: str) -> LoadedModel:
        """Serve the stub as ``model_id`` from ``<WEIGHTS_DIR>/<model_id>.pt``, or with its
        reproducible built-in weights when there is no such file."""
        config = stub_config(model_id)
        path = self.weights_dir / config.file
        if path.is_file():
            model = await self._run_blocking(load_model, config, path)
        else:
            log.info("no %s; serving %s with its built-in weights", path, model_id)
            model = await self._run_blocking(builtin_stub, model_id)
        self._models[model_id] = model
        self._configs[model_id] = config
        return model

    async def reload(
        self, model_id: str, weights_path: str, sha256: str | None = None
    ) -> tuple[str, str]:
        """Load a new file for a served model (same format, type and input shape) and swap
        it in; returns (old, new) versions. Raises ``ModelLoadError`` (the old one stays),
        409 when the file's sha256 is not ``sha256`` or, without one, the model's pin."""
        current = self._models.get(model_id)
        if current is None:
            raise ModelLoadError(f"model {model_id!r} is not served", 404)
        path = confine(self.weights_dir, weights_path)
        config = self._configs[model_id]
        lock = self._reload_locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            fresh: LoadedModel = await self._run_blocking(
                load_model, config, path, sha256, self._tokenizer_path(config)
            )
            if fresh.spec != current.spec:
                raise ModelLoadError(
                    f"new weights change the model's interface from {current.spec} to {fresh.spec}"
                )
            old = self._models[model_id]
            self._models[model_id] = fresh
        log.info("reloaded %s: %s -> %s (%s)", model_id, old.version, fresh.version, path.name)
        return old.version, fresh.version
