"""Turning one batch of requests into replies.

Requests whose deadline has passed are answered ``expired`` without being computed; the
rest go through the model in one call, in the executor. When the model raises, the batch is
split in halves until the request(s) that make it raise are isolated: everyone else is
still answered, and each culprit is left pending (no reply, no ack), so it is retried after
``CLAIM_IDLE_MS`` and dead-lettered after ``MAX_DELIVERIES`` (see ``recovery``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bales_producer import wire

from .inference import InferenceExecutor, predict_requests
from .metrics import Metrics
from .models import LoadedModel
from .protocol import Request
from .registry import ModelRegistry
from .replies import Completion, error_completion, expired_completion, ok_completions
from .tracing import batch_span

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of a batch: replies to write, and requests left pending for a retry."""

    completions: list[Completion] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)


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

    async def process(self, batch: list[Request]) -> Outcome:
        """Answer one batch (all of one model)."""
        outcome = Outcome()
        started_ms = self.now_ms()
        live = [r for r in batch if r.deadline_ms > started_ms]
        expired = [r for r in batch if r.deadline_ms <= started_ms]
        if expired:
            outcome.completions += [expired_completion(r, started_ms) for r in expired]
            self.metrics.count(expired[0].model_id, wire.ERROR_EXPIRED, len(expired))
        if not live:
            return outcome
        model = self.registry.get(live[0].model_id)
        if model is None:  # unloaded since the request was decoded
            message = f"model {live[0].model_id} is no longer served"
            outcome.completions += [error_completion(r, wire.ERROR_INTERNAL, message) for r in live]
            self.metrics.count(live[0].model_id, wire.ERROR_INTERNAL, len(live))
            return outcome
        fresh = [r for r in live if not r.retried]
        if fresh:
            await self._compute(model, fresh, started_ms, outcome)
        for retry in (r for r in live if r.retried):  # a suspect: alone, so it spoils no batch
            await self._compute(model, [retry], started_ms, outcome)
        return outcome

    async def _compute(
        self, model: LoadedModel, requests: list[Request], started_ms: float, outcome: Outcome
    ) -> None:
        call_ms, call_s = self.now_ms(), time.monotonic()
        with batch_span(model.model_id, requests):
            run = await self.executor.run(predict_requests, model, requests)
        done_ms = self.now_ms()
        inference_s = (done_ms - call_ms) / 1000
        queued_s = run.thread_started_s - call_s
        self.metrics.observe_stages(
            executor_queue=queued_s,
            model=run.model_s,
            handback=time.monotonic() - call_s - queued_s - run.model_s,
        )
        for group, results in run.answered:
            self._answer(model, group, results, (started_ms, done_ms, inference_s), outcome)
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
