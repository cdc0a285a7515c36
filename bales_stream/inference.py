"""The bridge from the event loop to PyTorch: one thread pool, owned by the worker.

Torch never runs on the event-loop thread. Each pool thread runs torch with
``INTRA_OP_THREADS`` threads (default 1: at small batch sizes more only fight the event
loop, measured on the project machines), or the model's own ``intra_op_threads``, and
``THREAD_POOL_SIZE`` batches can run side by side.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .models import LoadedModel
from .protocol import Request

R = TypeVar("R")
_thread = threading.local()


def _init_thread(threads: int) -> None:
    torch.set_num_threads(threads)
    _thread.default = _thread.current = threads


def use_threads(threads: int | None) -> None:
    """Give torch ``threads`` intra-op threads in this pool thread (None: the default).
    Torch's intra-op setting holds per calling thread (OpenMP); set only when it changes."""
    default: int = getattr(_thread, "default", 1)
    wanted = threads or default
    if getattr(_thread, "current", None) != wanted:
        torch.set_num_threads(wanted)
        _thread.current = wanted


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
    real_elements: int = 0
    padded_elements: int = 0
    """Input values of the answered calls, and those added by padding."""
    thread_started_s: float = 0.0
    """``time.monotonic()`` when a pool thread took the batch up."""
    model_s: float = 0.0
    """Time in the pool thread: inputs, the model call(s) and the model type."""
    model_cpu_s: float = 0.0
    """The pool thread's CPU time for it (``model_s`` less waits for the GIL)."""


def predict_requests(model: LoadedModel, requests: Sequence[Request]) -> BatchRun:
    """Stack the requests' inputs into one batch and run the model once (in a pool thread).

    When the model raises, the batch is split in halves, recursively, until the requests
    that make it raise are alone: everyone else is still answered. A half whose sibling
    succeeded must hold a culprit, so it is split without being run whole (one culprit in
    32 takes 9 model calls on average, not 11). The splitting stays in this thread: one
    hand-off from the event loop per batch, not one per split (measured: the poison
    scenario of ``benchmarks.faults``)."""
    run = BatchRun(thread_started_s=time.monotonic())
    cpu_started_s = time.thread_time()
    use_threads(model.threads)
    _predict_or_split(model, requests, run, known_to_fail=False)
    run.model_s = time.monotonic() - run.thread_started_s
    run.model_cpu_s = time.thread_time() - cpu_started_s
    return run


def predict_calls(model: LoadedModel, calls: Sequence[Sequence[Request]]) -> list[BatchRun]:
    """``predict_requests`` for each of several batches, in one pool thread call."""
    return [predict_requests(model, requests) for requests in calls]


def _predict_or_split(
    model: LoadedModel,
    requests: Sequence[Request],
    run: BatchRun,
    known_to_fail: bool,
) -> bool:
    """Answer ``requests`` or isolate the ones the model raises on; True if one call did."""
    if not known_to_fail or len(requests) == 1:
        try:
            prediction = model.predict(requests)
            results = prediction.results
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
            run.real_elements += prediction.real_elements
            run.padded_elements += prediction.padded_elements
            return True
    half = len(requests) // 2
    first_ok = _predict_or_split(model, requests[:half], run, known_to_fail=False)
    _predict_or_split(model, requests[half:], run, known_to_fail=first_ok)
    return False


class InferenceExecutor:
    """Runs blocking (torch) calls in a dedicated thread pool."""

    def __init__(self, threads: int, intra_op_threads: int = 1) -> None:
        self.threads = threads
        self.intra_op_threads = intra_op_threads
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Create the thread pool."""
        self._pool = ThreadPoolExecutor(
            self.threads,
            thread_name_prefix="bales-infer",
            initializer=_init_thread,
            initargs=(self.intra_op_threads,),
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
