"""The daemon's configuration, defined once: each setting's default, bounds and help live
on its field here. `ListenerConfig` checks every bound when it is made (from Python or from
the command line: `cqrs-pg listen` builds its options from these fields, without bounds
of its own), so a bad value is refused in one line naming the setting and its option."""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from cqrs_pg.errors import ConfigError

# The server's bounds on what the daemon passes on: an integer argument (a batch's size),
# and a timeout (milliseconds in an integer).
MAX_INTEGER = 2**31 - 1
MAX_TIMEOUT = MAX_INTEGER // 1000
# The longest duration taken (a retention, an interval): a hundred years, which means
# "forever" here; the server's intervals and timestamps overflow far beyond it.
MAX_DURATION = 36_500 * 86_400


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    metavar: str | None = None,
    option: bool = True,
    duration: bool = False,
) -> Any:
    """A setting: its default, its bounds (minimum and maximum inclusive, `above`
    exclusive) and the help of its `listen` option (option False: none; duration: seconds,
    given on the command line as 30m, 12h, 7d)."""
    return field(
        default=default,
        metadata={"help": help, "minimum": minimum, "maximum": maximum, "above": above, "metavar": metavar,
                  "option": option, "duration": duration},
    )


@dataclass
class ListenerConfig:
    dsn: str
    # A catch-up's batch: larger ones touch each read-model row fewer times (a customer's
    # counts are updated once per batch, not per event) and pay the plan and commit less
    # often. At 1M events customer_stats alone applied 92,000 events/s in batches of 5,000,
    # 115,000 in 20,000, 129,000 in 50,000; a batch of 20,000 still commits within a
    # fifth of a second, and a python handler holds that many events at once.
    batch_size: int = setting(20_000, "Events per batch and transaction.", minimum=1, maximum=MAX_INTEGER,
                              metavar="N")
    # Fallback when no doorbell rings: correctness never depends on NOTIFY.
    poll_interval: float = setting(1.0, "Seconds between polls when no NOTIFY arrives.", minimum=0.01,
                                   maximum=3600, metavar="SECONDS")
    # Stay awake this long after the last event, so a busy stream of commands never has to
    # ring the doorbell at all; meanwhile look for work every linger_poll with one cheap
    # query (cqrs.look_for_work) and start a round as soon as there is some.
    linger: float = setting(0.2, "Stay awake this long after the last event.", minimum=0, option=False)
    linger_poll: float = setting(0.002, "Look for work this often while lingering.", above=0, option=False)
    # While events keep coming, start a round no sooner than batch_delay after the last one
    # started. Off by default: the apply budget alone spaces rounds, so while they are small
    # and quick the next starts as soon as there is work, and batches grow only as the
    # load (and so each round's work) does.
    batch_delay: float = setting(
        0.0,
        "While events keep coming, start a round of batches at most once per this many seconds: fewer, "
        "bigger batches, at the price of latency. 0: only --apply-budget spaces rounds.",
        minimum=0, metavar="SECONDS",
    )
    # ... and, once the rounds have worked their share of the time (cqrs_pg.pacing's
    # credit, over BUDGET_WINDOW), no sooner than w / apply_budget after one that worked
    # w, the longest time a projection of the round worked on its batches (its
    # statements, commits included). Small rounds cost little and follow at once; on a
    # loaded server the work grows and waits for the CPU too: rounds come less often,
    # their batches grow and the per-batch fixed cost falls, so the daemon leaves the
    # commands their CPU; latency under load grows instead (never past poll_interval).
    apply_budget: float = setting(
        0.25,
        "While events keep coming, rounds of batches take at most this share of the time (over any 1 s): "
        "within it a round follows the last at once; beyond it, after a round whose batches took t seconds "
        "the next waits t/FRACTION (at most --poll-interval). On a loaded server batches grow and the daemon "
        "leaves the commands more CPU; latency under load grows instead. 1: off.",
        above=0, maximum=1, metavar="FRACTION",
    )
    # Before a round, take a mark (cqrs.take_mark) and wait up to this long for the
    # transactions running then to end: the round then reads everything committed up to
    # its start, not only what earlier marks cover (sql/cqrs/DESIGN.md). A mark is also
    # taken as each wait between rounds begins: usable by the time the next round starts,
    # whatever this wait finds.
    mark_wait: float = setting(0.01, "Wait this long for running transactions before a round.", minimum=0,
                               option=False)
    refresh_interval: float = setting(1.0, "Refresh materialized views at most this often (seconds).", minimum=0,
                                      maximum=86_400,
                                      metavar="SECONDS")
    # A materialized view's refresh recomputes all of it: keep the share of time spent
    # refreshing it at most this, by waiting longer between refreshes than
    # refresh_interval when the last one took more than refresh_budget of it.
    refresh_budget: float = setting(
        0.1,
        "At most this share of the time refreshing one materialized view: after a refresh that took "
        "t seconds the next waits at least t/FRACTION (a refresh recomputes the whole view).",
        above=0, maximum=1, metavar="FRACTION",
    )
    # Batches per projection before giving the others a turn.
    batches_per_turn: int = setting(10, "Batches per projection before the others' turn.", minimum=1, option=False)
    projections: list[str] | None = None
    # Warn when committed events have waited this long behind an open transaction, and
    # again every stall_warning seconds while they still wait.
    stall_warning: float = setting(
        30.0,
        "Warn, naming the blocking backend, when committed events have waited this long behind an open transaction.",
        above=0, metavar="SECONDS",
    )
    # A batch that fails is tried again retry_attempts times, retry_backoff seconds later,
    # doubling; then narrowed, halving, to the event that fails, which gets retry_attempts
    # tries too before the projection's policy (on_error) halts it there or parks the event.
    # The other projections go on meanwhile.
    retry_attempts: int = setting(
        3,
        "Tries of a failing batch, and then of the one event that fails, before the projection's policy "
        "halts it there or parks the event; the other projections go on.",
        minimum=1, metavar="N",
    )
    retry_backoff: float = setting(
        0.2, "Wait before trying a failed batch again; doubles with each try (at most 30 s).", minimum=0,
        metavar="SECONDS",
    )
    # The daemon's own timeouts on its connections, whatever the database's defaults: a
    # statement (a batch, a refresh) or a lock wait that takes longer is a projection's
    # error, retried as above; 0: none.
    statement_timeout: float = setting(
        600.0,
        "The daemon's own statement_timeout, whatever the database's: a batch or refresh that takes longer "
        "is that projection's error (retried, then its policy). 0: none.",
        minimum=0, maximum=MAX_TIMEOUT, metavar="SECONDS",
    )
    lock_timeout: float = setting(
        60.0,
        "The daemon's own lock_timeout: a batch that waits longer for a lock is that projection's error. 0: none.",
        minimum=0, maximum=MAX_TIMEOUT, metavar="SECONDS",
    )
    # At INFO, a one-line summary this often: events applied since the last, lag, state.
    summary_interval: float = setting(
        60.0, "Log a one-line summary (events applied, lag, state) this often at INFO; 0: never.", minimum=0,
        metavar="SECONDS",
    )
    # Retention on a schedule: cqrs.prune with this keep period every prune_interval (None:
    # never). Whatever these say, the daemon keeps the outbox's partitions ahead of its
    # sequence (cqrs.extend_outbox) once a minute.
    prune_keep: float | None = setting(
        None,
        "Every --prune-interval, drop outbox history older than this that every projection has passed, "
        "as `cqrs-pg prune --keep` does (default: never).",
        minimum=0, maximum=MAX_DURATION, metavar="DURATION", duration=True,
    )
    prune_interval: float = setting(3600.0, "How often --prune-keep prunes.", minimum=1, maximum=MAX_DURATION,
                                    metavar="DURATION", duration=True)
    # Serve Prometheus metrics on this port (0: any free port; None: not served).
    metrics_port: int | None = setting(
        None, "Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: off).", minimum=0, maximum=65535,
        metavar="PORT",
    )
    metrics_addr: str = "0.0.0.0"
    listener_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        for f in fields(self):
            bounds = f.metadata
            value = getattr(self, f.name)
            if "help" not in bounds or value is None:
                continue
            problem = _out_of_bounds(value, bounds["minimum"], bounds["maximum"], bounds["above"])
            if problem is None and f.type in ("int", "int | None") and not isinstance(value, int):
                problem = "a whole number"

            if problem is not None:
                where = f" (listen --{f.name.replace('_', '-')})" if bounds["option"] else ""
                raise ConfigError(f"{f.name}{where} must be {problem}, not {value!r}")
        if not isinstance(self.dsn, str) or not self.dsn.strip():
            raise ConfigError("dsn must be a libpq conninfo or URI, not empty")
        if not self.listener_id.strip() or len(self.listener_id) > 200:
            raise ConfigError(f"listener_id must be 1 to 200 characters, not {len(self.listener_id)}")


def _out_of_bounds(value: Any, minimum: float | None, maximum: float | None, above: float | None) -> str | None:
    """What value must be, when it is not (None: within its bounds)."""
    wanted = []
    if above is not None:
        wanted.append(f"above {_number(above)}")
    if minimum is not None:
        wanted.append(f"at least {_number(minimum)}")
    if maximum is not None:
        wanted.append(f"at most {_number(maximum)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "a finite number " + " and ".join(wanted) if wanted else "a finite number"
    if (above is not None and value <= above) or (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        return " and ".join(wanted)
    return None


def _number(bound: float) -> str:
    """A bound as written: whole numbers in full (2147483647, not 2.14748e+09)."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def option_settings() -> list[Any]:
    """The settings `cqrs-pg listen` offers as options, in their order here."""
    return [f for f in fields(ListenerConfig) if f.metadata.get("option")]
