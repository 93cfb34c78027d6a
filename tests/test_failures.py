"""A projection that fails on an event stops only itself (SPEC, guarantee 7): the daemon
retries, narrows the batch to the event, then halts there (policy halt) or parks the event
(policy park); the other projections go on and the daemon never exits for it. Operators see
it in `status` and `parked`, and end it with `retry` or `skip`. A restarted daemon tries
the event again and never skips it. The daemon's own timeouts hold whatever the database's
are."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cqrs_pg import projections
from cqrs_pg.daemon import Listener
from cqrs_pg.projections import Event
from cqrs_pg_tools.testing import (
    PROJECTIONS,
    Daemon,
    Database,
    assert_one_line_error,
    cli,
    running_daemon,
    scalar,
    wait_until,
)

# Quick retries: a failing event is acted on within a fraction of a second.
QUICK = {"retry_attempts": 2, "retry_backoff": 0.01, "poll_interval": 0.05, "batch_size": 8}

# A sql projection that records every event it applies, and fails (SQLSTATE 22012) on the
# registration of a customer named in shop_proj.poison while that table holds the name.
SEEN = """
CREATE TABLE shop_read.seen (position bigint PRIMARY KEY, event_type text NOT NULL);
CREATE TABLE shop_proj.poison (name text PRIMARY KEY);
CREATE FUNCTION shop_proj.apply_seen(from_position bigint, to_position bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM cqrs.batch(from_position, to_position) b
                WHERE b.payload ->> 'name' IN (SELECT name FROM shop_proj.poison)) THEN
        RAISE EXCEPTION 'poisoned customer in events % to %', from_position + 1, to_position
              USING ERRCODE = 'division_by_zero';
    END IF;
    INSERT INTO seen SELECT b.position, b.event_type FROM cqrs.batch(from_position, to_position) b;
END
$$;
"""


def install_seen(conn: psycopg.Connection, name: str = "seen", on_error: str = "halt", kind: str = "sql") -> None:
    conn.execute(SEEN)
    conn.execute("INSERT INTO shop_proj.poison VALUES ('Poison')")
    if kind == "sql":
        conn.execute(
            "SELECT cqrs.register_projection(%s, 'sql', 'shop_proj.apply_seen', search_path => 'shop_read, shop_proj',"
            " tables => ARRAY['shop_read.seen']::regclass[], on_error => %s)",
            (name, on_error),
        )
    else:
        conn.execute(
            "SELECT cqrs.register_projection(%s, 'python', search_path => 'shop_read, shop_proj',"
            " tables => ARRAY['shop_read.seen']::regclass[], on_error => %s)",
            (name, on_error),
        )


def customer(conn: psycopg.Connection, name: str) -> int:
    """Registers a customer; returns the position of its event."""
    conn.execute(
        "SELECT shop.register_customer(gen_random_uuid(), %s, %s)", (f"{name.lower()}-{uuid.uuid4().hex[:6]}@x.example", name)
    )
    position: int = scalar(conn, "SELECT max(position) FROM cqrs.outbox")
    return position


def row(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        found = cur.execute("SELECT * FROM cqrs.projection_status() WHERE name = %s", (name,)).fetchone()
    assert found is not None
    return found


def seen(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT position FROM shop_read.seen ORDER BY position")]


def caught_up(conn: psycopg.Connection, names: tuple[str, ...] = PROJECTIONS) -> bool:
    last = scalar(conn, "SELECT max(position) FROM cqrs.outbox")
    return all(row(conn, name)["last_position"] >= last and row(conn, name)["events_behind"] == 0 for name in names)


def status_json(db: Database) -> tuple[int, dict[str, Any]]:
    done = cli("status", "--json", "--dsn", db.dsn)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def daemon_thread(db: Database) -> Iterator[Listener]:
    with running_daemon(db.dsn, **QUICK) as listener:
        yield listener


def test_a_poison_event_halts_its_sql_projection_only(db: Database) -> None:
    """The daemon stays up, the other projections apply every event, the failing one stays
    at the event before the poison one; status names it and exits 3; skip refuses another
    position, then skips that one and the projection goes on."""
    with db.connect() as conn:
        install_seen(conn)
        before = customer(conn, "Alice")
        poison = customer(conn, "Poison")
        with running_daemon(db.dsn, **QUICK) as listener:
            wait_until(lambda: row(conn, "seen")["state"] == "halted", "seen to halt")
            after = customer(conn, "Bob")
            wait_until(lambda: caught_up(conn), "the other projections to apply every event")
            status = row(conn, "seen")
            assert status["last_position"] == before and status["failed_position"] == poison
            assert status["failed_event_type"] == "customer.created"
            assert status["failed_sqlstate"] == "22012" and "poisoned customer" in status["failed_error"]
            assert status["failed_attempts"] == QUICK["retry_attempts"]
            assert seen(conn)[-1] == before
            assert not listener.stopping
            assert 'cqrs_pg_projection_halted{projection="seen"} 1.0' in listener.metrics.render()

            code, report = status_json(db)
            assert code == 3
            (halted,) = [p for p in report["projections"] if p["name"] == "seen"]
            assert (halted["state"], halted["failed_position"]) == ("halted", poison)
            assert any("seen: halted at event" in problem for problem in report["problems"])
            assert all(p["state"] == "running" for p in report["projections"] if p["name"] != "seen")

            refused = cli("skip", "seen", "--position", str(after), "--dsn", db.dsn)
            assert_one_line_error(refused, "seen", f"halted at event {poison}, not {after}")
            assert row(conn, "seen")["state"] == "halted"
            refused = cli("skip", "order_summary", "--position", str(poison), "--dsn", db.dsn)
            assert_one_line_error(refused, "order_summary", "is not halted")

            done = cli("skip", "seen", "--position", str(poison), "--dsn", db.dsn)
            assert done.returncode == 0, done.stderr
            wait_until(lambda: caught_up(conn, ("seen", *PROJECTIONS)), "seen to go on after the skipped event")
            assert poison not in seen(conn) and after in seen(conn) and before in seen(conn)
            assert row(conn, "seen")["state"] == "running"
            assert 'cqrs_pg_projection_halted{projection="seen"} 0.0' in listener.metrics.render() or wait_until(
                lambda: 'cqrs_pg_projection_halted{projection="seen"} 0.0' in listener.metrics.render(),
                "the halted gauge to fall")
    listed = json.loads(cli("parked", "seen", "--json", "--dsn", db.dsn).stdout)
    assert [(p["position"], p["outcome"], p["sqlstate"]) for p in listed] == [(poison, "skipped", "22012")]
    code, _ = status_json(db)
    assert code == 0


def test_a_python_handler_that_raises_halts_it_until_retried(db: Database) -> None:
    """A python projection's exception halts only it; once the cause is fixed, `retry`
    applies the event and it goes on."""
    poisoned = threading.Event()
    poisoned.set()

    def apply(conn: psycopg.Connection, events: list[Event]) -> None:
        for e in events:
            if poisoned.is_set() and e.payload.get("name") == "Poison":
                raise ValueError(f"cannot handle customer {e.payload['name']}")
            conn.execute("INSERT INTO seen VALUES (%s, %s)", (e.position, e.event_type))

    projections.register("seen_py")(apply)
    try:
        with db.connect() as conn:
            install_seen(conn, "seen_py", kind="python")
            customer(conn, "Alice")
            poison = customer(conn, "Poison")
            with running_daemon(db.dsn, **QUICK):
                wait_until(lambda: row(conn, "seen_py")["state"] == "halted", "seen_py to halt")
                customer(conn, "Bob")
                wait_until(lambda: caught_up(conn), "the other projections to go on")
                status = row(conn, "seen_py")
                assert status["failed_position"] == poison and status["failed_sqlstate"] is None
                assert status["failed_error"] == "ValueError: cannot handle customer Poison"

                poisoned.clear()  # the fix, deployed
                done = cli("retry", "seen_py", "--dsn", db.dsn)
                assert done.returncode == 0, done.stderr
                assert f"running again from event {poison}" in done.stdout
                wait_until(lambda: caught_up(conn, ("seen_py",)), "seen_py to apply the event and go on")
                assert poison in seen(conn) and row(conn, "seen_py")["state"] == "running"
            refused = cli("retry", "seen_py", "--dsn", db.dsn)
            assert_one_line_error(refused, "seen_py", "nothing to retry")
            assert_one_line_error(cli("retry", "nope", "--dsn", db.dsn), "'nope' does not exist")
    finally:
        projections.unregister("seen_py")


def test_a_python_projection_parks_and_applies_again_on_retry(db: Database) -> None:
    """Policy park for a python handler: its exception sets the event aside, the rest is
    applied; `retry` runs the handler on the parked event alone, in its own transaction."""
    poisoned = threading.Event()
    poisoned.set()

    def apply(conn: psycopg.Connection, events: list[Event]) -> None:
        for e in events:
            if poisoned.is_set() and e.payload.get("name") == "Poison":
                raise ValueError("not yet")
            conn.execute("INSERT INTO seen VALUES (%s, %s)", (e.position, e.event_type))

    projections.register("seen_park")(apply)
    try:
        with db.connect() as conn:
            install_seen(conn, "seen_park", on_error="park", kind="python")
            before = customer(conn, "Alice")
            poison = customer(conn, "Poison")
            after = customer(conn, "Bob")
            with running_daemon(db.dsn, **QUICK):
                wait_until(lambda: caught_up(conn, ("seen_park",)), "seen_park to go on past the parked event")
                assert seen(conn) == [p for p in seen(conn) if p != poison] and {before, after} <= set(seen(conn))
                assert scalar(conn, "SELECT outcome || ' ' || error FROM cqrs.parked") == "parked ValueError: not yet"
                poisoned.clear()
                assert cli("retry", "seen_park", "--dsn", db.dsn).returncode == 0
                wait_until(lambda: scalar(conn, "SELECT count(*) FROM cqrs.parked") == 0, "the parked event to apply")
                assert poison in seen(conn) and row(conn, "seen_park")["state"] == "running"
    finally:
        projections.unregister("seen_park")


def test_park_sets_the_event_aside_and_retry_applies_it_again(db: Database) -> None:
    """Policy park: the event is recorded with its error, SQLSTATE and tries, the projection
    goes on without halting; `retry` applies the parked event once it can be."""
    with db.connect() as conn:
        install_seen(conn, on_error="park")
        customer(conn, "Alice")
        poison = customer(conn, "Poison")
        with running_daemon(db.dsn, **QUICK):
            after = customer(conn, "Bob")
            wait_until(lambda: caught_up(conn, ("seen", *PROJECTIONS)), "seen to go on past the parked event")
            assert row(conn, "seen")["state"] == "running" and row(conn, "seen")["parked"] == 1
            assert poison not in seen(conn) and after in seen(conn)
            listed = json.loads(cli("parked", "--json", "--dsn", db.dsn).stdout)
            assert [(p["projection"], p["position"], p["outcome"], p["sqlstate"], p["attempts"]) for p in listed] == [
                ("seen", poison, "parked", "22012", QUICK["retry_attempts"])
            ]
            assert "poisoned customer" in listed[0]["error"]
            assert code_of(db) == 0  # parked is not halted

            retried = cli("retry", "seen", "--dsn", db.dsn)  # still poisoned: fails again, stays parked
            assert retried.returncode == 0 and "1 parked event queued" in retried.stdout, retried.stderr
            wait_until(lambda: scalar(conn, "SELECT attempts FROM cqrs.parked") == QUICK["retry_attempts"] + 1,
                       "the parked event to be tried again")
            assert scalar(conn, "SELECT retry FROM cqrs.parked") is False

            conn.execute("DELETE FROM shop_proj.poison")
            assert cli("retry", "seen", "--dsn", db.dsn).returncode == 0
            wait_until(lambda: scalar(conn, "SELECT count(*) FROM cqrs.parked") == 0, "the parked event to apply")
            assert poison in seen(conn)
    assert cli("parked", "--dsn", db.dsn).stdout.strip() == "no parked or skipped events"
    assert_one_line_error(cli("parked", "nope", "--dsn", db.dsn), "'nope' does not exist")


@pytest.mark.parametrize("on_error", ["halt", "park"])
def test_a_rebuild_past_the_failed_event_ends_the_halt_or_the_parking(db: Database, on_error: str) -> None:
    """A rebuild applies every event up to its checkpoint: once the cause is fixed, a
    halted projection rebuilt past its event runs again, and a parked event is no longer
    listed as set aside, since the new read model holds it."""
    with db.connect() as conn:
        install_seen(conn, on_error=on_error)
        poison = customer(conn, "Poison")
        with running_daemon(db.dsn, **QUICK):
            if on_error == "halt":
                wait_until(lambda: row(conn, "seen")["state"] == "halted", "seen to halt")
            else:
                wait_until(lambda: row(conn, "seen")["parked"] == 1, "seen to park the event")
        conn.execute("DELETE FROM shop_proj.poison")
        done = cli("rebuild", "seen", "--dsn", db.dsn)
        assert done.returncode == 0, done.stderr
        status = row(conn, "seen")
        assert (status["state"], status["failed_position"], status["parked"]) == ("running", None, 0)
        assert status["last_position"] >= poison and poison in seen(conn)
        assert code_of(db) == 0


def code_of(db: Database) -> int:
    return status_json(db)[0]


def test_a_restarted_daemon_tries_the_event_again_and_never_skips_it(db: Database, tmp_path: Path) -> None:
    quick = ("--retry-attempts", "2", "--retry-backoff", "0.01", "--batch-size", "8")
    with db.connect() as conn:
        install_seen(conn)
        customer(conn, "Alice")
        poison = customer(conn, "Poison")
        daemon = Daemon(db, tmp_path / "listen.log", *quick)
        try:
            wait_until(lambda: row(conn, "seen")["state"] == "halted", "seen to halt")
            assert daemon.alive()
            assert f"seen: halted at event {poison} (customer.created) after 2 tries" in daemon.output
            assert daemon.stop() == 0
            daemon.start()
            wait_until(lambda: row(conn, "seen")["failed_attempts"] == 4, "the new daemon to try the event twice more")
            assert row(conn, "seen")["state"] == "halted" and row(conn, "seen")["failed_position"] == poison
            conn.execute("DELETE FROM shop_proj.poison")
            assert daemon.stop() == 0
            daemon.start()  # fixed meanwhile: the new daemon applies it
            wait_until(lambda: poison in seen(conn), "the restarted daemon to apply the event")
            assert row(conn, "seen")["state"] == "running"
        finally:
            daemon.stop()
    assert "Traceback" not in daemon.output


def test_projections_registered_or_removed_while_the_daemon_runs(db: Database, daemon_thread: Listener) -> None:
    with db.connect() as conn:
        customer(conn, "Alice")
        wait_until(lambda: caught_up(conn), "the example's projections")
        install_seen(conn)
        conn.execute("DELETE FROM shop_proj.poison")
        wait_until(lambda: caught_up(conn, ("seen",)), "the new projection to be picked up and caught up")
        conn.execute("DELETE FROM cqrs.projections WHERE name = 'customer_stats'")
        customer(conn, "Bob")
        wait_until(lambda: caught_up(conn, ("seen", "order_summary", "product_sales")), "the others to go on")
        wait_until(lambda: "customer_stats" not in daemon_thread.serving, "the daemon to let the removed one go")
        assert not daemon_thread.stopping


def test_the_daemon_keeps_its_own_statement_timeout(db: Database) -> None:
    """A database statement_timeout shorter than a refresh does not stop the view from
    refreshing (the daemon sets its own); a refresh longer than the daemon's own timeout
    halts that view only, naming the timeout, and the others go on."""
    with db.connect() as conn:
        conn.execute(
            "CREATE FUNCTION shop_proj.slowly(n bigint) RETURNS bigint LANGUAGE sql AS 'SELECT n FROM pg_sleep(0.3)';"
            "CREATE MATERIALIZED VIEW shop_read.slow AS"
            " SELECT 1 AS id, shop_proj.slowly((SELECT count(*) FROM shop.customers)) AS customers;"
            "CREATE UNIQUE INDEX ON shop_read.slow (id);"
            "SELECT cqrs.register_projection('slow', 'matview', matview => 'shop_read.slow');"
        )
        conn.execute(f"ALTER DATABASE {db.name} SET statement_timeout = '100ms'")
        customer(conn, "Alice")
        with running_daemon(db.dsn, **QUICK):
            wait_until(lambda: scalar(conn, "SELECT customers FROM shop_read.slow") == 1, "the slow view to refresh")
            assert row(conn, "slow")["state"] == "running"
        with running_daemon(db.dsn, **{**QUICK, "statement_timeout": 0.1}):
            customer(conn, "Bob")
            wait_until(lambda: row(conn, "slow")["state"] == "halted", "the view to halt on the daemon's own timeout")
            assert row(conn, "slow")["failed_sqlstate"] == "57014"
            customer(conn, "Carol")
            wait_until(lambda: caught_up(conn), "the other projections to go on")


@pytest.mark.parametrize(
    ("call", "sqlstate", "message"),
    [
        ("'x', 'python', search_path => 's', on_error => 'ignore'", "CQ001", "on_error must be 'halt' or 'park', not 'ignore'"),
        ("'x', 'matview', matview => 'shop_read.product_sales', on_error => 'park'", "CQ001", "cannot park events"),
        ("'x', 'stream'", "CQ001", "kind must be 'sql', 'matview' or 'python', not 'stream'"),
        ("'x', 'sql', 'shop_proj.apply_seen'", "CQ001", "needs apply_function, search_path and tables"),
        ("'x', 'python'", "CQ001", "python projection 'x' needs search_path"),
        ("'x', 'matview'", "CQ001", "matview projection 'x' needs matview"),
        ("'   ', 'python', search_path => 's'", "CQ001", "name"),
        (f"'{'n' * 51}', 'python', search_path => 's'", "CQ001", "name"),
        ("'order_summary', 'python', search_path => 's'", "CQ003", "projection 'order_summary' is already registered"),
        # what would fail only when run, or rebuilt
        ("'x', 'matview', matview => 'shop_read.order_summary'", "CQ001",
         "shop_read.order_summary is not a materialized view"),
        ("'x', 'python', search_path => 'shop_read, shop_raed'", "CQ001",
         "schema shop_raed of its search_path does not exist"),
        ("'x', 'python', search_path => 'shop_read,,shop_proj'", "CQ001",
         "search_path must be a list of schemas separated by commas"),
        ("'x', 'python', search_path => 'shop_read', tables => ARRAY['shop_read.product_sales']::regclass[]", "CQ001",
         "shop_read.product_sales is not a table"),
        ("'x', 'sql', 'shop_proj.apply_seen', search_path => 'shop_read, shop_proj',"
         " tables => ARRAY['shop_read.seen', 'shop_read.order_summary']::regclass[]", "CQ003",
         "table shop_read.order_summary belongs to projection 'order_summary' already"),
        ("'x', 'python', search_path => '\"$user\", shop_read', tables => ARRAY['shop_read.customer_stats']::regclass[]",
         "CQ003", "belongs to projection 'customer_stats' already"),
    ],
)
def test_a_registration_is_refused_with_one_clear_error(db: Database, call: str, sqlstate: str, message: str) -> None:
    """Refused when called, changing nothing, rather than failing at every batch or
    swapping out another projection's table at a rebuild."""
    with db.connect() as conn:
        conn.execute(SEEN)
        before = scalar(conn, "SELECT count(*) FROM cqrs.projections")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"SELECT cqrs.register_projection({call})")
        assert refused.value.sqlstate == sqlstate
        assert message in (refused.value.diag.message_primary or "")
        assert scalar(conn, "SELECT count(*) FROM cqrs.projections") == before
