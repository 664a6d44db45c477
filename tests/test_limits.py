"""Limits validation, the token bucket and the typing timers (pure code, time passed in)."""

from __future__ import annotations

import dataclasses

import pytest

from pmhub.limits import Limits, TokenBucket, TypingTimers

# -- TokenBucket ---------------------------------------------------------------------


def test_bucket_allows_a_full_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10.0, burst=20, now=100.0)
    assert [bucket.take(100.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(100.0) == pytest.approx(0.1)
    assert bucket.take(100.05) == pytest.approx(0.05)


def test_refused_take_does_not_consume() -> None:
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    for _ in range(5):
        assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


def test_bucket_refills_at_rate_up_to_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    for _ in range(5):
        bucket.take(0.0)
    # 0.25 s at 10/s gives 2.5 tokens: two takes, then wait for the half token missing.
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) == pytest.approx(0.05)
    # A long pause refills only up to the burst.
    assert [bucket.take(1000.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1000.0) > 0


def test_full_reports_a_completely_refilled_bucket() -> None:
    bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
    assert bucket.full(0.0)
    bucket.take(0.0)
    assert not bucket.full(0.1)
    assert bucket.full(0.25)


# -- TypingTimers ---------------------------------------------------------------------


def test_no_timer_no_deadline() -> None:
    timers = TypingTimers(3.0)
    assert timers.next_deadline() is None
    assert timers.expire(1e9) == []


def test_timers_expire_in_deadline_order() -> None:
    timers = TypingTimers(3.0)
    timers.start(1, 2, now=0.0)
    timers.start(3, 4, now=1.0)
    timers.start(5, 6, now=2.0)
    assert timers.next_deadline() == 3.0
    assert timers.expire(2.9) == []
    assert timers.expire(4.0) == [(1, 2), (3, 4)]
    assert timers.next_deadline() == 5.0
    assert timers.expire(5.0) == [(5, 6)]
    assert timers.next_deadline() is None


def test_refresh_moves_a_timer_to_its_new_deadline() -> None:
    timers = TypingTimers(3.0)
    timers.start(1, 2, now=0.0)
    timers.start(3, 4, now=1.0)
    timers.start(1, 2, now=2.0)  # refreshed: now expires after (3, 4)
    assert timers.next_deadline() == 4.0
    assert timers.expire(4.5) == [(3, 4)]
    assert timers.expire(5.0) == [(1, 2)]


def test_stop_cancels_one_timer() -> None:
    timers = TypingTimers(3.0)
    timers.start(1, 2, now=0.0)
    timers.start(1, 3, now=0.0)
    assert timers.stop(1, 2)
    assert not timers.stop(1, 2)
    assert not timers.stop(9, 9)
    assert timers.expire(10.0) == [(1, 3)]


def test_stop_user_cancels_every_timer_of_that_user() -> None:
    timers = TypingTimers(3.0)
    timers.start(1, 2, now=0.0)
    timers.start(4, 1, now=0.0)
    timers.start(1, 3, now=1.0)
    assert timers.stop_user(1) == [2, 3]
    assert timers.stop_user(1) == []
    assert timers.expire(10.0) == [(4, 1)]


# -- Limits ---------------------------------------------------------------------------


def test_defaults_are_the_protocol_defaults() -> None:
    limits = Limits()
    assert limits.max_content_length == 4000
    assert limits.max_frame_size == 64 * 1024
    assert (limits.message_rate, limits.message_burst) == (10.0, 20)
    assert limits.typing_rate == 5.0
    assert limits.typing_timeout == 3.0
    assert limits.max_invalid_frames == 50
    assert limits.sync_page_size == 500
    assert limits.max_history_page == 200
    assert (limits.ping_interval, limits.ping_timeout) == (20.0, 20.0)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Limits)])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_limit_raises_value_error(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"Limits.{name} must be positive"):
        Limits(**{name: value})


def test_defaults_that_protect_the_server() -> None:
    limits = Limits()
    assert limits.max_queue_bytes == 1024 * 1024
    assert limits.max_connections_per_user == 20
    assert limits.max_batch_size == 1000


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Limits().max_queue = 5  # type: ignore[misc]
