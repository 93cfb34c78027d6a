"""What `cqrs-pg listen` tells its operator: the stall warning naming the backend that holds
the xmin fence, structured (JSON) logs, and Prometheus metrics on --metrics-port."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from cqrs_pg.metrics import NAMES, Metrics
from cqrs_pg_tools.testing import (
    LOG_LINE,
    PROJECTIONS,
    UNREACHABLE,
    Daemon,
    Database,
    assert_one_line_error,
    cli,
    new_customer,
    outbox_count,
    scalar,
    wait_until,
)

STALL = "projections stalled for"
STALL_OVER = "projections moving again"


def some_commands(conn: psycopg.Connection) -> int:
    """A customer, a product and an order; returns the order's token."""
    customer = scalar(
        conn,
        "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), %s, 'Obs')",
        (f"{uuid.uuid4().hex[:10]}@example.com",),
    )
    sku = f"SKU-{uuid.uuid4().hex[:6]}"
    conn.execute("SELECT * FROM shop.add_product(gen_random_uuid(), %s, 'Thing', 250, 10)", (sku,))
    return int(
        scalar(
            conn,
            "SELECT token FROM shop.place_order(gen_random_uuid(), %s, %s)",
            (customer, Jsonb([{"sku": sku, "quantity": 2}])),
        )
    )


def caught_up(conn: psycopg.Connection, token: int) -> bool:
    return bool(scalar(conn, "SELECT cqrs.caught_up(%s)", (token,)))


def lines_with(output: str, *fragments: str) -> list[str]:
    return [line for line in output.splitlines() if all(f in line for f in fragments)]


def log_time(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


# -- 1. the stall warning -----------------------------------------------------------------


@pytest.mark.slow  # waits for two warnings a second apart
def test_stall_warning_names_the_backend_holding_the_fence(db: Database, daemons: Callable[..., Daemon]) -> None:
    with db.connect() as conn:
        daemon = daemons(db, "--stall-warning", "1")
        daemon.wait_registered(conn)
        db.wait_caught_up(some_commands(conn), timeout=15, replica=False)

        with psycopg.connect(db.dsn, autocommit=False, application_name="obs-blocker") as blocker:
            blocker.execute("SELECT pg_current_xact_id()")  # an xid, left open
            pid = blocker.info.backend_pid
            token = new_customer(conn, "Late")  # commits after the blocker took its xid

            mine = (STALL, f"pid {pid} ")
            # Warned within a few seconds, and again (at most once a second) while it lasts.
            wait_until(lambda: len(lines_with(daemon.output, *mine)) >= 2, f"two stall warnings naming pid {pid}", timeout=15)
            first, second = lines_with(daemon.output, *mine)[:2]
            for line in (first, second):
                assert LOG_LINE.match(line) and " WARNING cqrs_pg.daemon: " in line, line
                assert f"database {db.name}" in line and "application 'obs-blocker'" in line, line
                assert "state idle in transaction" in line and "query started " in line, line
                assert line.endswith(": SELECT pg_current_xact_id()"), line
            assert (log_time(second) - log_time(first)).total_seconds() >= 0.95
            assert not caught_up(conn, token), "an event behind an open transaction was applied"
            # Watching the stall, the daemon holds no xid itself (it would hold the fence too).
            daemon_xids = "SELECT count(*) FROM cqrs.fence_blockers() WHERE application_name = 'cqrs-pg listen'"
            assert scalar(conn, daemon_xids) == 0
            assert STALL_OVER not in daemon.output
            blocker.rollback()

        db.wait_caught_up(token, timeout=15, replica=False)
        wait_until(lambda: STALL_OVER in daemon.output, "the daemon to log that the stall ended", timeout=10)
        (over,) = lines_with(daemon.output, STALL_OVER)
        assert " INFO cqrs_pg.daemon: " in over
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output
        assert "Traceback" not in daemon.output


def test_no_stall_warning_without_a_blocker(db: Database, daemons: Callable[..., Daemon]) -> None:
    """An open transaction that writes nothing holds no xid and stalls nothing."""
    with db.connect() as conn:
        daemon = daemons(db, "--stall-warning", "0.3")
        daemon.wait_registered(conn)
        with psycopg.connect(db.dsn, autocommit=False) as reader:
            reader.execute("SELECT count(*) FROM shop.customers")  # a snapshot, no xid
            for _ in range(3):
                token = new_customer(conn, "Late")
                wait_until(lambda token=token: caught_up(conn, token), "the daemon to apply behind an open reader", timeout=10)
            reader.rollback()
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output
        assert STALL not in daemon.output, daemon.output


# -- 2. JSON logs -------------------------------------------------------------------------


def test_json_logs(db: Database, daemons: Callable[..., Daemon]) -> None:
    with db.connect() as conn:
        daemon = daemons(db, "--log-format", "json", "--log-level", "debug", "--stall-warning", "0.5")
        daemon.wait_registered(conn)
        db.wait_caught_up(some_commands(conn), timeout=15, replica=False)
        with psycopg.connect(db.dsn, autocommit=False, application_name="obs-json") as blocker:
            blocker.execute("SELECT pg_current_xact_id()")
            pid = blocker.info.backend_pid
            token = new_customer(conn, "Late")
            wait_until(lambda: f'"pid": {pid},' in daemon.output, "a JSON stall warning", timeout=15)
            blocker.rollback()
        db.wait_caught_up(token, timeout=15, replica=False)
        wait_until(lambda: STALL_OVER in daemon.output, "the end of the stall", timeout=10)
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output

    records = [json.loads(line) for line in daemon.output.splitlines()]  # every line is JSON
    assert len(records) >= 5
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
        ts = datetime.fromisoformat(record["ts"])
        assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0, record
        assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR"}, record
    messages = [r["message"] for r in records]
    assert any(m.startswith("listening on ") for m in messages)
    assert any(m == "received SIGTERM: finishing" for m in messages)

    batches = [r for r in records if "applied" in r and "projection" in r]
    assert {r["projection"] for r in batches} == set(PROJECTIONS), batches
    assert all(r["level"] == "DEBUG" and r["applied"] > 0 and r["duration_ms"] >= 0 for r in batches), batches

    (warning, *_) = [r for r in records if r["message"].startswith(STALL)]
    assert warning["logger"] == "cqrs_pg.daemon" and warning["level"] == "WARNING"
    assert warning["pid"] == pid and warning["application_name"] == "obs-json" and warning["database"] == db.name
    assert warning["state"] == "idle in transaction" and warning["query"] == "SELECT pg_current_xact_id()"
    assert warning["blocker_seconds"] > 0 and warning["stalled_seconds"] >= 0.5
    (over,) = [r for r in records if r["message"].startswith(STALL_OVER)]
    assert over["level"] == "INFO" and over["stalled_seconds"] > 0


def test_the_periodic_summary_says_what_it_applied_and_how_far_behind(db: Database,
                                                                      daemons: Callable[..., Daemon]) -> None:
    """At INFO, one line per --summary-interval: events applied since the last line per
    projection, the state, and how far behind (caught up, here)."""
    with db.connect() as conn:
        daemon = daemons(db, "--log-format", "json", "--summary-interval", "0.5")
        daemon.wait_registered(conn)
        db.wait_caught_up(some_commands(conn), timeout=15, replica=False)
        new_events = outbox_count(conn)

        def summaries() -> list[dict[str, object]]:
            records = [json.loads(line) for line in daemon.output.splitlines() if line.startswith("{")]
            return [r for r in records if "applied_by_projection" in r and "state" in r]

        wait_until(lambda: sum(sum(r["applied_by_projection"].values()) for r in summaries())  # type: ignore[union-attr]
                   == new_events * len(PROJECTIONS) and summaries()[-1]["applied"] == 0, "summaries of every event")
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output
    lines = summaries()
    assert all(r["level"] == "INFO" and r["state"] in {"asleep", "lingering", "busy", "draining", "refreshing"}
               for r in lines)
    assert any(r["applied"] > 0 and "applied" in str(r["message"]) for r in lines)
    assert lines[-1]["events_behind"] == 0 and "caught up" in str(lines[-1]["message"])


# -- 3. Prometheus metrics ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_projection(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    return {dict(labels)["projection"]: v for (n, labels), v in samples.items() if n == name}


@pytest.mark.slow
def test_metrics(db: Database, daemons: Callable[..., Daemon]) -> None:
    port = free_port()
    with db.connect() as conn:
        daemon = daemons(db, "--metrics-port", str(port))
        daemon.wait_registered(conn)
        for _ in range(3):
            token = some_commands(conn)
        db.wait_caught_up(token, timeout=15, replica=False)
        events = outbox_count(conn)
        assert events >= 9

        def applied_equals_outbox() -> bool:
            return per_projection(scrape(port), "cqrs_pg_events_applied_total") == dict.fromkeys(PROJECTIONS, events)

        wait_until(applied_equals_outbox, "events_applied_total to equal the outbox for each projection", timeout=10)
        samples = scrape(port)
        for name in ("cqrs_pg_lag_events", "cqrs_pg_lag_seconds"):
            lag = per_projection(samples, name)
            assert set(lag) == set(PROJECTIONS), (name, lag)
            assert all(v >= 0 for v in lag.values()), (name, lag)
        for name in ("cqrs_pg_batch_size_count", "cqrs_pg_batch_duration_seconds_count"):
            assert set(per_projection(samples, name)) == set(PROJECTIONS), name
            assert all(v >= 1 for v in per_projection(samples, name).values()), name
        assert per_projection(samples, "cqrs_pg_batch_size_sum") == dict.fromkeys(PROJECTIONS, events)
        assert samples[("cqrs_pg_fence_blocked_seconds", ())] == 0
        assert samples[("cqrs_pg_reconnects_total", ())] == 0

        # Cut the daemon's connection: it reconnects, counts it, and goes on applying.
        killed = scalar(
            conn,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'cqrs-pg listen' AND datname = current_database()",
        )
        assert killed == 1
        wait_until(lambda: scrape(port)[("cqrs_pg_reconnects_total", ())] == 1, "the reconnect to be counted", timeout=15)
        token = some_commands(conn)
        db.wait_caught_up(token, timeout=15, replica=False)
        events = outbox_count(conn)
        wait_until(applied_equals_outbox, "the daemon to apply after reconnecting", timeout=10)
        assert "reconnected" in daemon.output

        assert daemon.signal(signal.SIGTERM) == 0, daemon.output
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # the server went with the daemon


def test_metrics_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("listen", "--dsn", UNREACHABLE, "--metrics-port", str(port))
    assert_one_line_error(proc, "cannot serve metrics", str(port))


def test_metrics_registries_are_separate() -> None:
    one, two = Metrics(), Metrics()
    one.batch("p", 5, 0.01)
    one.lag("p", 3, 1.5)
    one.reconnected()
    text = one.render()
    for name in NAMES:
        assert f"# TYPE {name} " in text, name
    assert 'cqrs_pg_events_applied_total{projection="p"} 5.0' in text
    assert 'cqrs_pg_events_applied_total{projection="p"}' not in two.render()
