"""The one retry policy: doubling waits from the start to a cap, reset by a success."""

from __future__ import annotations

import pytest

from bales_stream.backoff import BACKOFF_MAX_S, BACKOFF_START_S, Backoff, delay_s

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)


def test_waits_double_up_to_the_cap_and_start_over_after_a_success() -> None:
    backoff = Backoff(start_s=0.5, max_s=3.0)
    assert [backoff.next_s() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.failures == 5
    backoff.reset()
    assert (backoff.next_s(), backoff.failures) == (0.5, 1)


def test_the_defaults_and_the_nth_wait() -> None:
    assert delay_s(1) == BACKOFF_START_S and delay_s(100) == BACKOFF_MAX_S
    assert delay_s(0) == BACKOFF_START_S  # no failure yet: never less than the start
    assert delay_s(3, start_s=1.0, max_s=60.0) == 4.0
