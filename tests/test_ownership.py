"""Only the engine can hold a projection, and diagnostics show no more than the caller
may see (SPEC, guarantee 8): a login with no grants cannot stop a projection; a session
that does hold one is named by `status` and by the daemon's warning; the engine's
SECURITY DEFINER diagnostics hide other roles' queries from the listener role."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cqrs_pg_tools.testing import PROJECTIONS, Daemon, Database, cli, new_customer, running_daemon, scalar, wait_until


def test_a_login_without_grants_cannot_hold_a_projection(db: Database, login_as: Callable[..., str]) -> None:
    """Whatever such a login locks — advisory keys of every space the engine ever used,
    the engine's tables — the daemon applies every event."""
    nobody = make_conninfo(db.dsn, user=login_as(None))
    with psycopg.connect(nobody, autocommit=False) as attacker, db.connect() as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM cqrs.projections")]
        for space in (1668444016, 1668444017, 1668444018):
            for name in names:
                attacker.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (space, name))
                attacker.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (space, name))
        attacker.commit()  # session locks stay held
        for statement in ("SELECT 1 FROM cqrs.projections FOR UPDATE", "LOCK TABLE cqrs.projections",
                          "LOCK TABLE cqrs.rebuilds", "SELECT cqrs.run_projection('order_summary')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute(statement)
            attacker.rollback()
        attacker.execute("SELECT pg_advisory_lock(1668444016, hashtext('order_summary'))")  # held again, to be sure
        token = new_customer(conn, "Own")
        assert scalar(conn, "SELECT applied FROM cqrs.run_projection('customer_stats')") == 1
        with running_daemon(db.dsn):
            db.wait_caught_up(token, replica=False)
        assert scalar(conn, "SELECT bool_and(held_by_pid IS NULL) FROM cqrs.projection_status()")


def test_a_session_holding_a_projection_is_named(db: Database, daemons: Callable[..., Daemon]) -> None:
    """The owner's session that holds a projection's row: that projection waits (nothing is
    skipped), `status --json` names the session, the daemon warns naming it; once it lets
    go every event is applied."""
    others = [p for p in PROJECTIONS if p != "customer_stats"]
    with db.connect() as conn:
        # The event first, applied by a daemon of the other projections (their marks make
        # it final): the holder's transaction, newer, then holds back only customer_stats.
        first = daemons(db, *(arg for p in others for arg in ("--projection", p)))
        token = new_customer(conn, "Own")
        wait_until(lambda: all(scalar(conn, "SELECT cqrs.caught_up(%s, %s)", (token, p)) for p in others),
                   "the other projections to apply the event")
        with psycopg.connect(db.dsn, autocommit=False, application_name="forgotten psql") as holder:
            holder.execute("SELECT 1 FROM cqrs.projections WHERE name = 'customer_stats' FOR UPDATE")
            pid = holder.info.backend_pid
            daemon = daemons(db, "--stall-warning", "0.5", "--poll-interval", "0.1")
            daemon.wait_registered(conn)
            wait_until(lambda: f"customer_stats: held by pid {pid}" in daemon.output, "the daemon's warning")
            assert not scalar(conn, "SELECT cqrs.caught_up(%s, 'customer_stats')", (token,))

            report = json.loads(cli("status", "--json", "--dsn", db.dsn).stdout)
            (held,) = [p for p in report["projections"] if p["name"] == "customer_stats"]
            assert (held["held_by_pid"], held["held_by_application"]) == (pid, "forgotten psql")
            assert held["held_by_state"] == "idle in transaction" and held["held_seconds"] > 0
            text = cli("status", "--dsn", db.dsn).stdout
            assert f"customer_stats held by pid {pid}" in text and "forgotten psql" in text
            holder.rollback()
        db.wait_caught_up(token, replica=False)
        assert daemon.signal(signal.SIGTERM) == 0 and first.signal(signal.SIGTERM) == 0


def test_diagnostics_show_the_listener_no_other_roles_query(db: Database, login_as: Callable[..., str]) -> None:
    """cqrs.fence_blockers() runs as the engine's owner: to the listener role it names an
    open transaction of another role (pid, role, application) but not its state, times or
    query, as pg_stat_activity would not; its own role's, and with pg_read_all_stats any,
    it shows in full."""
    listener = login_as("cqrs_listener")
    with psycopg.connect(db.dsn, autocommit=False, application_name="secretive") as other:
        other.execute("SELECT 'the secret plan', pg_current_xact_id()")
        pid = other.info.backend_pid
        with psycopg.connect(make_conninfo(db.dsn, user=listener), autocommit=True) as conn:
            seen = conn.execute(
                "SELECT application_name, state, xact_start, query_start, seconds, query FROM cqrs.fence_blockers()"
                " WHERE pid = %s", (pid,)).fetchone()
            assert seen == ("secretive", None, None, None, None, None)
            mine = psycopg.connect(make_conninfo(db.dsn, user=listener), autocommit=False, application_name="mine")
            with mine:
                mine.execute("SELECT 'my own plan', pg_current_xact_id()")
                own = conn.execute("SELECT state, query FROM cqrs.fence_blockers() WHERE pid = %s",
                                   (mine.info.backend_pid,)).fetchone()
                assert own == ("idle in transaction", "SELECT 'my own plan', pg_current_xact_id()")
                mine.rollback()
        with db.connect() as admin:
            admin.execute(f'GRANT pg_read_all_stats TO "{listener}"')
        with psycopg.connect(make_conninfo(db.dsn, user=listener), autocommit=True) as conn:
            query = scalar(conn, "SELECT query FROM cqrs.fence_blockers() WHERE pid = %s", (pid,))
            assert query == "SELECT 'the secret plan', pg_current_xact_id()"
        other.rollback()
