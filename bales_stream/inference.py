"""The bridge from the event loop to PyTorch: one thread pool, owned by the worker.

Torch never runs on the event-loop thread. Each pool thread runs torch single-threaded:
at these batch sizes more intra-op threads only fight the event loop (measured on the
project machines), and ``THREAD_POOL_SIZE`` batches can run side by side.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from .models import LoadedModel
from .protocol import Request

R = TypeVar("R")


def _init_thread() -> None:
    torch.set_num_threads(1)


@dataclass
class BatchRun:
    """What running a batch gave: groups of requests answered together (with their results,
    in order) and the requests the model raised on, each isolated and with its error."""

    answered: list[tuple[Sequence[Request], list[dict[str, Any] | None]]] = field(
        default_factory=list
    )
    """None for a request whose output was not finite."""
    failed: list[tuple[Request, Exception]] = field(default_factory=list)
    model_failures: int = 0


def predict_requests(model: LoadedModel, requests: Sequence[Request]) -> BatchRun:
    """Stack the requests' inputs into one batch and run the model once (in a pool thread).

    When the model raises, the batch is split in halves, recursively, until the requests
    that make it raise are alone: everyone else is still answered. A half whose sibling
    succeeded must hold a culprit, so it is split without being run whole (one culprit in
    32 takes 9 model calls on average, not 11). The splitting stays in this thread: one
    hand-off from the event loop per batch, not one per split (measured: the poison
    scenario of ``benchmarks.faults``)."""
    run = BatchRun()
    _predict_or_split(model, requests, None, run, known_to_fail=False)
    return run


def _predict_or_split(
    model: LoadedModel,
    requests: Sequence[Request],
    batch: np.ndarray | None,
    run: BatchRun,
    known_to_fail: bool,
) -> bool:
    """Answer ``requests`` or isolate the ones the model raises on; True if one call did."""
    if not known_to_fail or len(requests) == 1:
        try:
            if batch is None:  # stacked once; the halves are views of it
                batch = np.stack([request.inputs for request in requests])
            results = model.predict(batch)
            if len(results) != len(requests):
                raise RuntimeError(
                    f"model {model.model_id} returned {len(results)} results for "
                    f"{len(requests)} inputs"
                )
        except Exception as exc:
            run.model_failures += 1
            if len(requests) == 1:
                run.failed.append((requests[0], exc))
                return False
        else:
            run.answered.append((requests, results))
            return True
    half = len(requests) // 2
    first, second = (None, None) if batch is None else (batch[:half], batch[half:])
    first_ok = _predict_or_split(model, requests[:half], first, run, known_to_fail=False)
    _predict_or_split(model, requests[half:], second, run, known_to_fail=first_ok)
    return False


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
