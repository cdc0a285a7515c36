"""Turning batches of requests into replies.

Requests whose deadline has passed are answered ``expired`` without being computed; the
rest of a batch go through the model in one call, in the executor. Under a backlog, several
full batches of a fast model are handed to the executor together (one hand-off, one
completion round trip: see ``HANDOFF_BUDGET_S``); each is still its own model call. When
the model raises, the batch is split in halves until the request(s) that make it raise are
isolated: everyone else is still answered, and each culprit is left pending (no reply, no
ack), so it is retried after ``CLAIM_IDLE_MS`` and dead-lettered after ``MAX_DELIVERIES``
(see ``recovery``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bales_producer import wire

from .inference import BatchRun, InferenceExecutor, predict_calls
from .metrics import Metrics
from .models import LoadedModel
from .protocol import Request
from .registry import ModelRegistry
from .replies import Completion, error_completion, expired_completion, ok_completions
from .tracing import batch_span

log = logging.getLogger(__name__)

HANDOFF_BUDGET_S = 0.002
"""Batches of one model handed to the executor together take at most about this much model
CPU time in all, by the model's cheapest recent batch (under load the pool threads' CPU time
grows with the waits for the GIL, so the least is the model's own cost). A hand-off and a
completion round trip cost the event loop more than a small model's batch does, while a
slow model's batches still go one at a time, so none waits long behind another."""
MAX_BATCHES_PER_HANDOFF = 4
BATCH_COST_DRIFT = 1.02
"""The cheapest-batch estimate rises by 2 % a batch, so it follows a model that became
slower (a reload, longer inputs)."""


@dataclass
class Outcome:
    """What became of a batch: replies to write, and requests left pending for a retry."""

    completions: list[Completion] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)


def batches_per_handoff(cheapest_batch_s: float | None) -> int:
    """As many batches as fit in ``HANDOFF_BUDGET_S`` of the model's cheapest recent batch
    (CPU seconds), 1 to ``MAX_BATCHES_PER_HANDOFF``; 1 while the model has not run yet."""
    if cheapest_batch_s is None:
        return 1
    fit = int(HANDOFF_BUDGET_S / max(cheapest_batch_s, 1e-9))
    return max(1, min(MAX_BATCHES_PER_HANDOFF, fit))


class BatchProcessor:
    """Computes batches; owns no tasks and no Redis."""

    def __init__(
        self,
        registry: ModelRegistry,
        executor: InferenceExecutor,
        metrics: Metrics,
        now_ms: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.metrics = metrics
        self.now_ms = now_ms
        self._batch_s: dict[str, float] = {}
        """Per model, the CPU time of its cheapest recent batch in the pool thread."""

    def batches_per_handoff(self, model_id: str) -> int:
        """How many full batches of ``model_id`` may go to the executor together."""
        return batches_per_handoff(self._batch_s.get(model_id))

    async def process(self, batches: Sequence[Sequence[Request]]) -> Outcome:
        """Answer batches of one model, computed in one hand-off to the executor."""
        outcome = Outcome()
        started_ms = self.now_ms()
        calls: list[Sequence[Request]] = []
        model: LoadedModel | None = None
        for batch in batches:
            live = [r for r in batch if r.deadline_ms > started_ms]
            expired = [r for r in batch if r.deadline_ms <= started_ms]
            if expired:
                outcome.completions += [expired_completion(r, started_ms) for r in expired]
                self.metrics.count(expired[0].model_id, wire.ERROR_EXPIRED, len(expired))
            if not live:
                continue
            model = self.registry.get(live[0].model_id)
            if model is None:  # unloaded since the request was decoded
                message = f"model {live[0].model_id} is no longer served"
                outcome.completions += [
                    error_completion(r, wire.ERROR_INTERNAL, message) for r in live
                ]
                self.metrics.count(live[0].model_id, wire.ERROR_INTERNAL, len(live))
                continue
            fresh = [r for r in live if not r.retried]
            if fresh:
                calls.append(fresh)
            # a suspect goes alone, so it spoils no batch
            calls += [[r] for r in live if r.retried]
        if calls and model is not None:
            await self._compute(model, calls, started_ms, outcome)
        return outcome

    async def _compute(
        self,
        model: LoadedModel,
        calls: list[Sequence[Request]],
        started_ms: float,
        outcome: Outcome,
    ) -> None:
        call_s = time.monotonic()
        everyone = [r for call in calls for r in call]
        with batch_span(model.model_id, everyone):
            runs = await self.executor.run(predict_calls, model, calls)
        done_ms = self.now_ms()
        queued_s = runs[0].thread_started_s - call_s
        model_s = sum(run.model_s for run in runs)
        self.metrics.observe_stages(
            executor_queue=queued_s,
            model=model_s,
            handback=time.monotonic() - call_s - queued_s - model_s,
        )
        cheapest_s = min(run.model_cpu_s for run in runs)
        previous_s = self._batch_s.get(model.model_id, cheapest_s)
        self._batch_s[model.model_id] = min(previous_s * BATCH_COST_DRIFT, cheapest_s)
        for run in runs:
            for group, results in run.answered:
                times = (started_ms, done_ms, run.model_s)
                self._answer(model, group, results, times, outcome)
            self._count(model, run, outcome)

    def _count(self, model: LoadedModel, run: BatchRun, outcome: Outcome) -> None:
        if run.model_failures:
            self.metrics.model_failures.inc(run.model_failures)
        if run.real_elements:
            self.metrics.count_elements(model.model_id, run.real_elements, run.padded_elements)
        for request, exc in run.failed:
            log.warning(
                "model %s raised on request %s (entry %s of p%d): %s: %s; left pending for retry",
                model.model_id,
                request.request_id,
                request.entry_id,
                request.priority,
                type(exc).__name__,
                _last_line(exc),
                extra={
                    "request_id": request.request_id,
                    "entry_id": request.entry_id,
                    "priority": request.priority,
                    "traceparent": request.traceparent,
                },
            )
            outcome.failed.append(request)

    def _answer(
        self,
        model: LoadedModel,
        requests: Sequence[Request],
        results: list[dict[str, Any] | None],
        times: tuple[float, float, float],
        outcome: Outcome,
    ) -> None:
        started_ms, done_ms, inference_s = times
        self.metrics.batch_size.observe(len(requests))
        computed = [
            (r, result) for r, result in zip(requests, results, strict=True) if result is not None
        ]
        for request, result in zip(requests, results, strict=True):
            if result is None:
                outcome.completions.append(_invalid_output(request))
                self.metrics.count(model.model_id, wire.ERROR_INVALID_OUTPUT)
        if not computed:
            return
        latency_ms = [max(0.0, done_ms - r.enqueued_ms) for r, _ in computed]
        queued_ms = [max(0.0, started_ms - r.enqueued_ms) for r, _ in computed]
        self.metrics.observe_requests(
            [r.priority for r, _ in computed],
            latency_s=[ms / 1000 for ms in latency_ms],
            queued_s=[ms / 1000 for ms in queued_ms],
            inference_s=inference_s,
            in_redis_s=[max(0.0, r.read_ms - r.enqueued_ms) / 1000 for r, _ in computed],
            in_memory_s=[max(0.0, started_ms - r.read_ms) / 1000 for r, _ in computed],
        )
        outcome.completions += ok_completions(
            computed,
            model_version=model.version,
            batch_size=len(requests),
            queued_ms=[round(ms, 3) for ms in queued_ms],
            latency_ms=[round(ms, 3) for ms in latency_ms],
        )
        self.metrics.count(model.model_id, wire.STATUS_OK, len(computed))


def _invalid_output(request: Request) -> Completion:
    return error_completion(
        request,
        wire.ERROR_INVALID_OUTPUT,
        "the model's output for this input is not finite (NaN or infinity): the input is "
        "probably far outside the range the model works in",
    )


def _last_line(exc: Exception) -> str:
    """The gist of an error (TorchScript errors carry a whole traceback in their text)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else ""
