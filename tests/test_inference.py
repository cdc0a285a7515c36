"""Running a batch in the pool thread: isolating the requests a model raises on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from bales_stream.inference import predict_requests
from bales_stream.models import builtin_stub
from bales_stream.processing import (
    HANDOFF_BUDGET_S,
    MAX_BATCHES_PER_HANDOFF,
    batches_per_handoff,
)
from bales_stream.protocol import Request
from bales_stream.replies import expired_completion

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)

POISON = 42.0


class CountingPoisonNet(torch.nn.Module):
    """The stub, raising on any batch that holds a row starting with ``POISON``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if bool((x[:, 0] == POISON).any()):
            raise RuntimeError("poisoned input")
        return self.inner(x)


def requests_with_poison_at(positions: set[int], count: int = 32) -> list[Request]:
    rows = np.random.default_rng(5).standard_normal((count, 128)).astype(np.float32)
    rows[sorted(positions), 0] = POISON
    return [
        Request(0, f"{i}-0", f"r{i}", "stub_v1", {"input": rows[i]}, 0, 10**15, None)
        for i in range(count)
    ]


@pytest.mark.parametrize("positions", [set(), {0}, {31}, {13}, {3, 4}, {0, 17, 30}])
def test_every_healthy_request_is_answered_and_each_culprit_isolated(positions: set[int]) -> None:
    stub = builtin_stub("stub_v1")
    net = CountingPoisonNet(stub.module)  # type: ignore[arg-type]
    model = dataclasses.replace(stub, module=net)
    requests = requests_with_poison_at(positions)

    run = predict_requests(model, requests)

    answered = {
        r.request_id: result
        for group, results in run.answered
        for r, result in zip(group, results, strict=True)
    }
    assert {r.request_id for r, _ in run.failed} == {f"r{i}" for i in positions}
    assert answered.keys() == {f"r{i}" for i in range(32)} - {f"r{i}" for i in positions}
    expected = stub.predict(requests).results
    for i in set(range(32)) - positions:
        assert answered[f"r{i}"]["label"] == expected[i]["label"]
        assert answered[f"r{i}"]["confidence"] == pytest.approx(expected[i]["confidence"], rel=1e-5)
    assert all("poisoned input" in str(exc) for _, exc in run.failed)
    assert run.model_failures == net.calls - len(run.answered)


def test_a_half_whose_sibling_succeeded_is_split_without_running_it_whole() -> None:
    calls = []
    for position in range(32):
        stub = builtin_stub("stub_v1")
        net = CountingPoisonNet(stub.module)  # type: ignore[arg-type]
        predict_requests(dataclasses.replace(stub, module=net), requests_with_poison_at({position}))
        calls.append(net.calls)
    # plain halving runs both halves at each of the 5 levels: 11 calls for every position
    assert max(calls) == 11
    assert sum(calls) / len(calls) == 9


def test_an_expired_retry_says_an_earlier_delivery_went_unanswered() -> None:
    [request] = requests_with_poison_at(set(), count=1)
    fresh = json.loads(expired_completion(request, now_ms=10**15 + 5).document)
    request.retried = True
    retry = json.loads(expired_completion(request, now_ms=10**15 + 5).document)
    assert "earlier delivery" not in fresh["error"]["message"]
    assert (
        "an earlier delivery was not answered: the model raised on it"
        in (retry["error"]["message"])
    )


@pytest.mark.parametrize(
    ("cheapest_batch_s", "expected"),
    [
        (None, 1),  # not run yet: one batch at a time
        (0.0, MAX_BATCHES_PER_HANDOFF),
        (HANDOFF_BUDGET_S / 10, MAX_BATCHES_PER_HANDOFF),
        (HANDOFF_BUDGET_S / 2, 2),
        (HANDOFF_BUDGET_S / 1.5, 1),
        (HANDOFF_BUDGET_S * 10, 1),  # a slow model never makes others wait behind it
    ],
)
def test_a_fast_models_full_batches_share_a_handoff(
    cheapest_batch_s: float | None, expected: int
) -> None:
    assert batches_per_handoff(cheapest_batch_s) == expected
