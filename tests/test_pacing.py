"""The daemon's pacing policy (cqrs_pg.pacing) with a clock of the test's own, and its
configuration checked once, where it is defined (cqrs_pg.config)."""

from __future__ import annotations

import random

import pytest

from cqrs_pg.config import ListenerConfig, option_settings
from cqrs_pg.errors import ConfigError
from cqrs_pg.pacing import (
    BUDGET_WINDOW,
    WAIT_SLICE,
    Pace,
    Round,
    State,
    after_busy,
    after_round,
    credit_after,
    pace,
)
from cqrs_pg_tools.testing import assert_one_line_error, cli

CFG = ListenerConfig(dsn="host=unused", batch_delay=0.01, apply_budget=0.25, poll_interval=1.0, linger=0.2)
T0 = 1000.0  # the fake clock's start


def round_(ended: float = T0 + 0.005, started: float = T0, last_event: float | None = None, **found: object) -> Round:
    applied = bool(found.get("applied"))
    return Round(started=started, ended=ended, last_event=ended if applied else (last_event or T0 - 60), **found)  # type: ignore[arg-type]


def test_a_full_batch_drains_at_once() -> None:
    assert pace(CFG, round_(applied=5000, more=True, work=0.4)) == Pace(State.DRAINING, T0 + 0.005)


def test_a_light_round_waits_the_batch_delay_from_its_start() -> None:
    assert pace(CFG, round_(applied=3, work=0.001)) == Pace(State.BUSY, T0 + 0.01)
    # a round that took longer than the delay: the next one at once
    assert pace(CFG, round_(ended=T0 + 0.05, applied=3, work=0.001)) == Pace(State.BUSY, T0 + 0.05)


def test_heavy_work_spaces_rounds_by_the_apply_budget_up_to_the_poll_interval() -> None:
    assert pace(CFG, round_(applied=300, work=0.05)) == Pace(State.BUSY, pytest.approx(T0 + 0.05 / 0.25))
    assert pace(CFG, round_(applied=300, work=2.0)) == Pace(State.BUSY, T0 + CFG.poll_interval)
    off = ListenerConfig(dsn="x", apply_budget=1.0, batch_delay=0.0)
    assert pace(off, round_(applied=300, work=0.05)) == Pace(State.BUSY, pytest.approx(T0 + 0.05))


def test_a_quiet_moment_after_a_round_lets_the_next_start_at_once() -> None:
    """Events waiting as a round ends: the load goes on, and the budget spaces the rounds.
    None: the daemon lingers from now, and the next event starts a round as soon as it
    is found, however much the round before worked."""
    heavy = round_(applied=300, work=0.05)
    assert after_round(CFG, heavy, waiting=True, now=T0 + 0.006) == pace(CFG, heavy)
    assert after_round(CFG, heavy, waiting=False, now=T0 + 0.006) == Pace(State.LINGERING,
                                                                            pytest.approx(T0 + 0.006 + CFG.linger))
    # a full batch drains, waiting or not
    full = round_(applied=5000, more=True, work=0.4)
    assert after_round(CFG, full, waiting=False, now=T0 + 0.006) == Pace(State.DRAINING, T0 + 0.005)


def test_rounds_are_spaced_by_their_work_only_unless_a_batch_delay_is_asked_for() -> None:
    default = ListenerConfig(dsn="host=unused")
    assert default.batch_delay == 0
    assert pace(default, round_(applied=3, work=0.01)) == Pace(State.BUSY, pytest.approx(T0 + 0.01 / 0.25))


def test_while_the_budget_has_credit_the_next_round_starts_at_once() -> None:
    default = ListenerConfig(dsn="host=unused")
    assert pace(default, round_(applied=3, work=0.004, credit=0.001)) == Pace(State.BUSY, T0 + 0.005)
    # spent: the next round waits until the deficit is paid back at apply_budget
    assert pace(default, round_(applied=3, work=0.004, credit=-0.01)) == Pace(
        State.BUSY, pytest.approx(T0 + 0.005 + 0.01 / 0.25))
    # never past poll_interval after the round started, whatever the deficit
    assert pace(default, round_(applied=3, work=0.004, credit=-5.0)) == Pace(State.BUSY, T0 + default.poll_interval)


def test_the_credit_grows_with_time_up_to_the_window_and_pays_for_work() -> None:
    cap = CFG.apply_budget * BUDGET_WINDOW
    assert credit_after(CFG, 0.0, T0, T0 + 60, 0.0) == pytest.approx(cap)
    assert credit_after(CFG, cap, T0, T0 + 0.004, 0.02) == pytest.approx(cap - 0.02)
    assert credit_after(CFG, 0.01, T0, T0 + 0.02, 0.003) == pytest.approx(0.012)


def test_a_debt_is_paid_by_the_wait_after_its_round_not_carried() -> None:
    """Rounds after quiet moments start at once and may overspend; the round that then
    finds events waiting waits for its own work only (work / apply_budget), not for the
    debt of all of them."""
    deep = credit_after(CFG, -0.2, T0, T0 + 0.01, 0.003)
    assert deep == pytest.approx(-0.003)
    step = pace(CFG, Round(started=T0, ended=T0 + 0.003, last_event=T0 + 0.003, applied=5, work=0.003,
                           serving=2, credit=deep))
    assert step.state is State.BUSY
    assert step.until == pytest.approx(T0 + 0.003 + 0.003 / CFG.apply_budget)


@pytest.mark.parametrize(("rate", "waits"), [(100, False), (2000, True)])
def test_the_budget_holds_the_daemons_share_while_small_rounds_run_free(rate: int, waits: bool) -> None:
    """Events arriving steadily, a round costing 2 ms plus 20 us an event: at 100/s every
    round starts as soon as its event is there; at 2,000/s rounds wait, and over the run
    the daemon works at most apply_budget of the time (plus one window's burst)."""
    cfg = ListenerConfig(dsn="host=unused")
    clock = credit_at = T0
    credit = cfg.apply_budget * BUDGET_WINDOW
    arrived = applied = 0
    worked, waited = 0.0, False
    while clock < T0 + 5:
        arrived = int((clock - T0) * rate)
        if arrived == applied:
            clock = T0 + (applied + 1) / rate + 1e-9  # idle until the next event: at once after it
            continue
        n, started = arrived - applied, clock
        work = 0.002 + n * 0.00002
        clock += work
        worked += work
        applied += n
        credit, credit_at = credit_after(cfg, credit, credit_at, clock, work), clock
        step = pace(cfg, Round(started=started, ended=clock, last_event=clock, applied=n, work=work, serving=2,
                               credit=credit))
        assert step.state is State.BUSY
        waited = waited or step.until > clock + 1e-9
        clock = max(clock, step.until)
    assert waited is waits
    assert worked <= cfg.apply_budget * (clock - T0) + cfg.apply_budget * BUDGET_WINDOW + 0.003 or not waits


def test_after_a_busy_wait_it_lingers_from_then() -> None:
    busy = round_(applied=1, work=0.001)
    now = T0 + 0.01
    assert after_busy(CFG, busy, now) == Pace(State.LINGERING, pytest.approx(now + CFG.linger))


def test_recent_events_linger_then_sleep() -> None:
    last = T0 - 0.05
    assert pace(CFG, round_(last_event=last)) == Pace(State.LINGERING, pytest.approx(last + CFG.linger))
    assert pace(CFG, round_(last_event=T0 - 0.5)) == Pace(State.ASLEEP, T0 + 0.005 + CFG.poll_interval)


def test_a_failing_projections_next_try_shortens_the_sleep() -> None:
    assert pace(CFG, round_(retry_after=0.3)) == Pace(State.ASLEEP, pytest.approx(T0 + 0.305))
    assert pace(CFG, round_(retry_after=30.0)) == Pace(State.ASLEEP, T0 + 0.005 + CFG.poll_interval)


def test_running_refreshes_are_collected() -> None:
    assert pace(CFG, round_(pending=2, serving=2)) == Pace(State.REFRESHING, T0 + 0.005)
    assert pace(CFG, round_(pending=1, serving=3)) == Pace(State.LINGERING, pytest.approx(T0 + 0.005 + WAIT_SLICE))


def test_a_simulated_day_never_spins_nor_oversleeps() -> None:
    """Rounds driven by the policy on the fake clock, events arriving in bursts and
    silences: rounds that apply events never start closer together than batch_delay
    (unless draining a full batch), the daemon never waits past poll_interval, and it
    falls asleep only after linger without events."""
    rng = random.Random(7)
    clock, last_event, backlog = T0, T0, 0
    for _ in range(5000):
        backlog += rng.choice([0, 0, 0, 1, 3, 40, 9000])
        started = clock
        applied = min(backlog, CFG.batch_size)
        backlog -= applied
        work = applied * 0.00002
        clock += 0.001 + work
        if applied:
            last_event = clock
        step = pace(CFG, Round(started=started, ended=clock, last_event=last_event, applied=applied,
                               more=applied == CFG.batch_size, work=work, serving=3))
        assert step.until >= clock - 1e-9
        assert step.until - clock <= CFG.poll_interval + 1e-9
        if step.state is State.BUSY:
            assert step.until - started >= CFG.batch_delay - 1e-9
        if step.state is State.ASLEEP:
            assert clock - last_event >= CFG.linger
        if step.state is State.LINGERING and rng.random() < 0.5:
            step = Pace(step.state, clock + (step.until - clock) * rng.random())  # work found early
        clock = step.until


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("batch_size", 0, "batch_size (listen --batch-size) must be at least 1 and at most 2147483647, not 0"),
        # what the server would refuse later, at every batch, as a projection's error
        ("batch_size", 2**31, "at most 2147483647, not 2147483648"),
        ("statement_timeout", 1e12, "statement_timeout (listen --statement-timeout) must be at least 0 and at most"),
        ("lock_timeout", 1e12, "lock_timeout (listen --lock-timeout) must be at least 0 and at most"),
        ("refresh_interval", 1e300, "at most 86400, not 1e+300"),
        ("prune_keep", 1e15, "prune_keep (listen --prune-keep) must be at least 0 and at most"),
        ("batch_size", 2.5, "batch_size (listen --batch-size) must be a whole number, not 2.5"),
        ("apply_budget", 0.0, "must be above 0 and at most 1, not 0.0"),
        ("apply_budget", 1.5, "must be above 0 and at most 1, not 1.5"),
        ("poll_interval", float("nan"), "poll_interval (listen --poll-interval) must be a finite number"),
        ("retry_backoff", -1.0, "retry_backoff (listen --retry-backoff) must be at least 0, not -1.0"),
        ("linger_poll", 0.0, "linger_poll must be above 0, not 0.0"),
        ("metrics_port", 70000, "at most 65535, not 70000"),
    ],
)
def test_a_bad_setting_is_refused_where_it_is_defined(setting: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ListenerConfig(dsn="host=unused", **{setting: value})  # type: ignore[arg-type]
    assert message in str(refused.value)


def test_listen_options_come_from_the_config_and_are_checked_there() -> None:
    """One definition: every option's default is the config's, and the command line
    refuses a bad value with the config's one line."""
    help_text = " ".join(cli("listen", "--help").stdout.split())
    for f in option_settings():
        option = f"--{f.name.replace('_', '-')}"
        assert option in help_text
        if f.default is not None:
            assert f"{option} {f.metadata['metavar']}" in help_text
    refused = cli("listen", "--batch-size", "0", "--dsn", "host=unused")
    assert_one_line_error(refused, "batch_size (listen --batch-size) must be at least 1 and at most 2147483647, not 0")
