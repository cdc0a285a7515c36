"""The bridge from the event loop to PyTorch: one thread pool, owned by the worker.

Torch never runs on the event-loop thread. Each pool thread runs torch single-threaded:
at these batch sizes more intra-op threads only fight the event loop (measured: see
shared PERF-NOTES), and ``THREAD_POOL_SIZE`` batches can run side by side.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from .models import LoadedModel
from .protocol import Request

R = TypeVar("R")


def _init_thread() -> None:
    torch.set_num_threads(1)


def predict_requests(model: LoadedModel, requests: Sequence[Request]) -> list[dict[str, Any]]:
    """Stack the requests' inputs into one batch and run the model once (in a pool thread)."""
    batch = np.stack([request.inputs for request in requests])
    results = model.predict(batch)
    if len(results) != len(requests):
        raise RuntimeError(
            f"model {model.model_id} returned {len(results)} results for {len(requests)} inputs"
        )
    return results


class InferenceExecutor:
    """Runs blocking (torch) calls in a dedicated thread pool."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Create the thread pool."""
        self._pool = ThreadPoolExecutor(
            self.threads, thread_name_prefix="bales-infer", initializer=_init_thread
        )

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in the pool and await its result."""
        if self._pool is None:
            raise RuntimeError("InferenceExecutor.start() was not called")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def stop(self) -> None:
        """Wait for running calls to finish and release the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
