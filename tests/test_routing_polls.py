"""When the Router asks a replica again whether it has caught up (cqrs_pg.routing's poll
schedule), as a pure function of the time since the first poll, played against a clock of
the test's own: a change that comes when it usually does is seen within a fraction of a
millisecond for about as many polls as the plain schedule takes, and a long wait still
backs off."""

from __future__ import annotations

import pytest

from cqrs_pg.routing import _POLL_FAST_FOR, _POLL_MAX, _learnt, _PollSchedule

ROUND_TRIP = 0.0002


def watch(schedule: _PollSchedule, arrival: float) -> tuple[float, int]:
    """Polls (each a round trip, the replica answering at its middle) from 0 until one sees
    a change that reached the replica at `arrival`: when that answer came, and how many
    polls it took."""
    asked, polls = 0.0, 0
    while True:
        polls += 1
        if asked + ROUND_TRIP / 2 >= arrival:
            return asked + ROUND_TRIP, polls
        answered = asked + ROUND_TRIP
        asked = answered + schedule.sleep(answered)


@pytest.mark.parametrize("arrival", [0.0012, 0.0016, 0.0019, 0.0023, 0.0028])
def test_an_expected_wait_is_seen_at_once_for_no_more_polls(arrival: float) -> None:
    _, plain_polls = watch(_PollSchedule(), arrival)
    learnt_at, learnt_polls = watch(_PollSchedule(expected=0.0019), arrival)
    assert learnt_at - arrival <= 0.0006, learnt_at
    assert learnt_polls <= plain_polls + 1
    # the plain schedule is late by up to a poll period of about a millisecond
    assert max(watch(_PollSchedule(), a / 10_000)[0] - a / 10_000 for a in range(10, 30)) > 0.001


def test_an_early_change_waits_for_the_expected_moment_and_a_late_one_for_the_plain_schedule() -> None:
    # expected 2 ms: the first poll at once, the next at 1.5 ms
    schedule = _PollSchedule(expected=0.002)
    assert schedule.sleep(0.0002) == pytest.approx(0.0013)
    at, polls = watch(_PollSchedule(expected=0.002), 0.0004)
    assert 0.0015 <= at <= 0.0018 and polls == 2
    # far later than expected: after the fine window (to 4 ms), a poll a millisecond
    at, polls = watch(_PollSchedule(expected=0.002), 0.010)
    assert at - 0.010 <= 0.0013 and polls <= 6 + 10 + 1


def test_a_long_wait_backs_off_as_before() -> None:
    for expected in (None, 0.002, 0.5):
        schedule = _PollSchedule(expected=expected)
        assert schedule.sleep(_POLL_FAST_FOR + 0.5) <= _POLL_MAX
        for _ in range(20):
            schedule.sleep(1.0)
        assert schedule.sleep(1.0) == _POLL_MAX
    # a wait beyond the usual ones: the plain schedule
    assert _PollSchedule(expected=_POLL_FAST_FOR).sleep(0.0002) == _PollSchedule().sleep(0.0002)


def test_the_expected_wait_follows_the_waits_seen_and_a_long_one_counts_as_short() -> None:
    expected = _learnt(None, 0.002)
    assert expected == 0.002
    for _ in range(30):
        expected = _learnt(expected, 0.004)
    assert expected == pytest.approx(0.004, rel=0.01)
    # the daemon stopped for a second: one wait moves the expectation by a fifth of 20 ms at most
    after = _learnt(expected, 1.0)
    assert after == pytest.approx(expected + 0.2 * (_POLL_FAST_FOR - expected))
    for _ in range(15):
        after = _learnt(after, 0.004)
    assert after < 0.005
