"""When the daemon's next round starts: its states and the pacing policy, as a pure
function of what the last round found and the clock, so that it is tested with a clock
of the test's own (tests/test_pacing.py) and the loop (cqrs_pg.daemon) only acts on it.

A round runs every projection's turn once (a few batches each). After it the daemon is in
one of these states:

- ``draining``: a batch came back full, so more is waiting now: the next round at once.
- ``refreshing``: only materialized views' refreshes are running: collect them.
- ``busy``: events were applied and more came during the round (the load goes on). The
  apply budget is a credit of work time: it grows by ``apply_budget`` x the time that
  passes, up to that share of ``BUDGET_WINDOW``, and each round's work is taken from it.
  While it lasts, the next round starts at once: small, quick rounds follow each other as
  events come. Once spent, the next round waits until it is paid back, at most
  work / ``apply_budget`` after a round that worked that long (and no sooner than
  ``batch_delay`` after this one started; at most ``poll_interval``): batches grow with
  the load, and the daemon's share of the CPU stays bounded. The daemon is lingering once
  that wait is over. When none came during the round (a quiet moment), it is lingering at
  once.
- ``lingering``: events came recently: awake, looking for work every ``linger_poll`` with
  one cheap query until ``linger`` after the last event, and starting a round as soon as
  there is some.
- ``asleep``: quiet: commands ring the doorbell (NOTIFY) and the daemon waits for it, or
  for ``poll_interval`` (correctness never depends on the doorbell), or for a failing
  projection's next try.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cqrs_pg.config import ListenerConfig

# Wait for notifications, or for a running refresh, in slices this long, so a stop
# request is seen promptly.
WAIT_SLICE = 0.25
# The apply budget holds over any stretch this long: a burst of rounds may work up to
# apply_budget x this without waiting (at 0.25, 250 ms of work), and no more. Long
# enough to ride out a materialized view's refresh (a few hundred ms of a core), which
# slows the rounds beside it; a steady load is held to apply_budget all the same.
BUDGET_WINDOW = 1.0


class State(enum.Enum):
    DRAINING = "draining"
    REFRESHING = "refreshing"
    BUSY = "busy"
    LINGERING = "lingering"
    ASLEEP = "asleep"


@dataclass(frozen=True)
class Round:
    """What a round found, and when (monotonic seconds)."""

    started: float
    ended: float
    # when the daemon last applied an event (this round's end if it applied any)
    last_event: float
    applied: int = 0
    # some projection stopped at a full batch
    more: bool = False
    # seconds the longest sql or python turn worked, commits left out
    work: float = 0.0
    # turns still running (refreshes), and the projections served
    pending: int = 0
    serving: int = 0
    # the soonest a failing projection is tried again, in seconds from ended
    retry_after: float | None = None
    # the apply budget's credit after this round's work (credit_after); None: this
    # round's alone, none carried from before
    credit: float | None = None


@dataclass(frozen=True)
class Pace:
    """The state the daemon is in after a round, and until when it stays there (a
    monotonic deadline; the round itself ends it early in lingering, the doorbell in
    asleep)."""

    state: State
    until: float


def pace(cfg: ListenerConfig, r: Round) -> Pace:
    """The pacing policy: the state after round r and when the next round starts."""
    if r.serving and r.pending == r.serving:
        return Pace(State.REFRESHING, r.ended)
    if r.applied and r.more:
        return Pace(State.DRAINING, r.ended)
    if r.applied:
        credit = (r.ended - r.started) * cfg.apply_budget - r.work if r.credit is None else r.credit
        paid_back = r.ended + max(0.0, -credit) / cfg.apply_budget
        spacing_end = min(max(r.started + cfg.batch_delay, paid_back), r.started + cfg.poll_interval)
        return Pace(State.BUSY, max(r.ended, spacing_end))
    timeout = cfg.poll_interval if r.retry_after is None else min(cfg.poll_interval, r.retry_after)
    if r.pending:  # awake while a refresh runs, to collect it
        return Pace(State.LINGERING, r.ended + min(timeout, WAIT_SLICE))
    if r.ended - r.last_event < cfg.linger:
        return Pace(State.LINGERING, min(r.last_event + cfg.linger, r.ended + timeout))
    return Pace(State.ASLEEP, r.ended + timeout)


def credit_after(cfg: ListenerConfig, credit: float, since: float, now: float, work: float) -> float:
    """The apply budget's credit at `now`, after `work` seconds of a round: what it was at
    `since`, grown by apply_budget x the time between (up to apply_budget x BUDGET_WINDOW),
    less the work. A debt is never carried into a round: a round's work is paid by the
    one wait after it (work / apply_budget), not by the rounds after. Rounds that start
    after a quiet moment do not wait, and their debts would add up, under a steady light
    load, to one wait of up to poll_interval for whichever round found events waiting."""
    return max(0.0, min(cfg.apply_budget * BUDGET_WINDOW, credit + (now - since) * cfg.apply_budget)) - work


def after_round(cfg: ListenerConfig, r: Round, waiting: bool, now: float) -> Pace:
    """After a busy round (pace gave BUSY), once the daemon has looked for work: with
    events waiting already it stays busy until the spacing is over; without (a quiet
    moment) it lingers from now and starts the next round as soon as events come."""
    step = pace(cfg, r)
    if step.state is not State.BUSY or waiting:
        return step
    return after_busy(cfg, r, now)


def after_busy(cfg: ListenerConfig, r: Round, now: float) -> Pace:
    """Once a busy wait is over: lingering, from now (a long spacing is no quiet spell)."""
    return pace(cfg, Round(started=r.started, ended=now, last_event=now, pending=r.pending, serving=r.serving,
                           retry_after=r.retry_after, credit=r.credit))
