"""The `cqrs-pg` command line against real PostgreSQL: migrate, listen (as a real process,
stopped by signals and killed with SIGKILL), status, dev up/status/down, demo, the errors a
newcomer meets, and --help/--version."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from cqrs_pg import __version__
from cqrs_pg.cli import main
from cqrs_pg.migrate import head_revisions
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    PROJECTIONS,
    UNREACHABLE,
    Daemon,
    Database,
    applied_counts,
    assert_one_line_error,
    cli,
    make_root,
    outbox_count,
    scalar,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult

SCHEMAS = ("cqrs", "shop", "shop_read", "shop_proj")


# -- helpers ------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    """Run the CLI in-process and require success."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    assert result.exception is None, result.output
    return result


def schemas(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (list(SCHEMAS),))
        return {name for (name,) in rows}


def postgres_servers(fragment: str) -> list[str]:
    """Command lines of running `postgres -D ...` servers whose line contains fragment."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "postgres -D " in line and fragment in line]


# -- 1. migrate ---------------------------------------------------------------------------


def test_migrate_up_again_and_down(empty_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    heads = head_revisions()
    both = ", ".join(sorted(heads.values()))
    assert schemas(empty_db.dsn) == set()

    def cycle(*dsn_args: str) -> None:
        assert invoke("migrate", *dsn_args).output == f"migrated base -> {heads['cqrs']}\n"
        assert schemas(empty_db.dsn) == {"cqrs"}
        assert invoke("migrate", *dsn_args).output == f"already at {heads['cqrs']}\n"
        assert invoke("migrate", *dsn_args, "--example", "shop").output == f"migrated {heads['cqrs']} -> {both}\n"
        assert {"cqrs", "shop", "shop_read", "shop_proj"} <= schemas(empty_db.dsn)
        assert invoke("migrate", *dsn_args, "--to", "base").output == f"migrated {both} -> base\n"
        assert schemas(empty_db.dsn) == set()

    cycle("--dsn", empty_db.dsn)
    # The same with the DSN from the environment.
    monkeypatch.setenv("CQRS_PG_DSN", empty_db.dsn)
    cycle()


def test_migrate_to_unknown_revision_is_one_line(empty_db: Database) -> None:
    line = assert_one_line_error(cli("migrate", "--dsn", empty_db.dsn, "--to", "nope"), "nope")
    assert "revision" in line.lower()
    assert schemas(empty_db.dsn) == set()


# -- 2. listen: signals -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_listen_serves_then_stops_on_signal(db: Database, daemons: Callable[..., Daemon], signum: int) -> None:
    with db.connect() as conn:
        daemon = daemons(db, "--refresh-interval", "0.1")
        daemon.wait_registered(conn)

        customer = scalar(
            conn, "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'x@example.com', 'X')"
        )
        sku = f"SKU-{uuid.uuid4().hex[:6]}"
        conn.execute("SELECT * FROM shop.add_product(gen_random_uuid(), %s, 'Thing', 250, 10)", (sku,))
        order, token = conn.execute(
            "SELECT aggregate_id, token FROM shop.place_order(gen_random_uuid(), %s, %s)",
            (customer, Jsonb([{"sku": sku, "quantity": 2}])),
        ).fetchone()

        db.wait_caught_up(token)
        with db.connect_replica() as replica:
            row = replica.execute(
                "SELECT customer_name, customer_email, status, line_count, item_count, total_cents"
                " FROM shop_read.order_summary WHERE order_id = %s",
                (order,),
            ).fetchone()
            assert row == ("X", "x@example.com", "placed", 1, 2, 500)
            assert scalar(replica, "SELECT units_sold FROM shop_read.product_sales WHERE sku = %s", (sku,)) == 2

        assert daemon.signal(signum) == 0, daemon.output
        assert f"received {signal.Signals(signum).name}" in daemon.output
        assert "stopped after applying" in daemon.output
        assert "Traceback" not in daemon.output
        assert scalar(conn, "SELECT count(*) FROM cqrs.listeners") == 0


# -- 3. listen: SIGKILL and restart -------------------------------------------------------


def test_listen_killed_and_restarted_applies_every_event_once(db: Database, daemons: Callable[..., Daemon]) -> None:
    workload = ShopWorkload(db.dsn, seed=7)
    workload.setup(customers=20, products=8, stock=10_000)
    results: list[WorkloadResult] = []
    writer = threading.Thread(target=lambda: results.append(workload.run(4, commands_per_client=50)))

    with db.connect() as conn:

        def applied() -> int:
            return sum(applied_counts(conn).values())

        daemon = daemons(db, "--batch-size", "20", "--refresh-interval", "0.05")
        daemon.wait_registered(conn)
        writer.start()
        for _ in range(2):
            before = applied()
            wait_until(lambda before=before: applied() > before, "the daemon to apply events before SIGKILL")
            daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
            daemon = daemons(db, "--batch-size", "20", "--refresh-interval", "0.05")
        writer.join(timeout=60)
        assert not writer.is_alive(), "the workload did not finish"
        (result,) = results
        assert result.errors == []
        assert result.total > 100

        db.wait_caught_up(result.max_token, replica=False)
        db.wait_caught_up(result.max_token, replica=True)
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output

        total = outbox_count(conn)
        assert all_mismatches(conn) == NO_MISMATCH
        assert applied_counts(conn) == dict.fromkeys(PROJECTIONS, total)
        # The replica shows the same, once it has replayed the last checkpoint.
        lsn = scalar(conn, "SELECT pg_current_wal_lsn()::text")
        with db.connect_replica() as replica:
            wait_until(
                lambda: scalar(replica, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)),
                "the replica to replay the last checkpoint",
            )
            assert all_mismatches(replica) == NO_MISMATCH
            assert applied_counts(replica) == dict.fromkeys(PROJECTIONS, total)


# -- 4. status ----------------------------------------------------------------------------


def status_json(db: Database) -> dict[str, Any]:
    report = json.loads(invoke("status", "--json", "--dsn", db.dsn, "--replica-dsn", db.replica_dsn).stdout)
    assert isinstance(report, dict)
    return report


def test_status_text_and_json(db: Database) -> None:
    text = invoke("status", "--dsn", db.dsn, "--replica-dsn", db.replica_dsn).stdout
    for name in PROJECTIONS:
        assert name in text
    assert "(standby)" in text

    report = status_json(db)
    assert set(report) >= {"projections", "fence_blockers", "replication", "replicas"}
    assert sorted(p["name"] for p in report["projections"]) == sorted(PROJECTIONS)
    assert all(p["events_behind"] == 0 for p in report["projections"])
    assert [r["in_recovery"] for r in report["replicas"]] == [True]
    assert [r["application_name"] for r in report["replication"]] == ["replica1"]


def test_status_lists_an_open_transaction_holding_the_fence(db: Database) -> None:
    with psycopg.connect(db.dsn, autocommit=False) as blocker:
        try:
            blocker.execute("SELECT * FROM shop.register_customer(gen_random_uuid(), 'open@example.com', 'Open')")
            pid = blocker.info.backend_pid
            blockers = status_json(db)["fence_blockers"]
            assert pid in [b["pid"] for b in blockers], blockers
            mine = next(b for b in blockers if b["pid"] == pid)
            assert mine["database"] == db.name and mine["xid"]
            text = invoke("status", "--dsn", db.dsn).stdout
            assert "oldest open transaction holding the fence: pid" in text
        finally:
            blocker.rollback()
    assert pid not in [b["pid"] for b in status_json(db)["fence_blockers"]]


# -- 5. dev up / status / down ------------------------------------------------------------


def exported(stdout: str, name: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"export {name}=")]
    (assignment,) = shlex.split(line.removeprefix("export "))
    return assignment.split("=", 1)[1]


@pytest.mark.slow  # a cluster of its own
def test_dev_up_status_down() -> None:
    base = make_root("cqrs-pg-cli-")
    root = base / "c"
    try:
        up = invoke("dev", "up", "--root", str(root), "--replicas", "1")
        dsn, replica_dsn = exported(up.stdout, "CQRS_PG_DSN"), exported(up.stdout, "CQRS_PG_REPLICA_DSN")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert scalar(conn, "SELECT pg_is_in_recovery()") is False
        with psycopg.connect(replica_dsn, autocommit=True) as conn:
            assert scalar(conn, "SELECT pg_is_in_recovery()") is True

        status = invoke("dev", "status", "--root", str(root)).stdout.splitlines()
        assert [line.split()[:2] for line in status] == [["primary", "primary"], ["replica1", "replica"]]
        assert all(" running " in line for line in status), status

        assert invoke("dev", "down", "--root", str(root)).stdout.startswith("stopped and removed")
        assert not root.exists()
        assert "no cluster" in invoke("dev", "status", "--root", str(root)).stdout
        assert postgres_servers(str(root)) == []
    finally:
        if root.exists():
            DevCluster(root).down()
        shutil.rmtree(base, ignore_errors=True)


# -- 6. demo ------------------------------------------------------------------------------


@pytest.mark.slow  # a cluster of its own
def test_demo_runs_and_cleans_up() -> None:
    proc = cli("demo", "--seconds", "2", "--clients", "2", timeout=180)
    found = re.search(r"under (/tmp/cqrs-pg-demo-\S+) \.\.\.", proc.stdout)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert "read from the replica" in proc.stdout
        (verdict,) = [line for line in proc.stdout.splitlines() if "equals its definition" in line]
        assert verdict.endswith(": yes"), verdict
        assert found, proc.stdout
        root = found.group(1)
        # No `postgres -D /tmp/cqrs-pg-demo-...` server of this run is left (scoped to its own
        # root: another demo may be running on this machine at the same time).
        assert postgres_servers(root) == []
        assert not Path(root).exists()
    finally:
        if found and (Path(found.group(1)) / "cluster").exists():
            DevCluster(Path(found.group(1)) / "cluster").down()


# -- 7. errors a newcomer meets -----------------------------------------------------------


@pytest.mark.parametrize("command", ["migrate", "listen", "status"])
def test_no_dsn(command: str) -> None:
    assert_one_line_error(cli(command), "CQRS_PG_DSN", "--dsn")


@pytest.mark.parametrize("command", ["migrate", "status"])
def test_unreachable_server(command: str) -> None:
    assert_one_line_error(cli(command, "--dsn", UNREACHABLE), "cannot connect", "port=1")


@pytest.mark.parametrize("command", [["status"], ["listen"], ["relay", "--to", "nats://127.0.0.1:1"]])
def test_a_blank_or_malformed_dsn_is_one_line(command: list[str]) -> None:
    """A blank DSN is no DSN (libpq would connect to its own defaults); a malformed one is
    named as the connection string, and nothing is said to have started."""
    assert_one_line_error(cli(*command, "--dsn", "   "), "CQRS_PG_DSN", "--dsn")
    proc = cli(*command, "--dsn", "garbage")
    assert_one_line_error(proc, "invalid connection string 'garbage'")
    assert "listening on" not in proc.stderr and "\n\n" not in proc.stderr


def test_unreachable_server_says_why() -> None:
    line = assert_one_line_error(cli("status", "--dsn", UNREACHABLE), "cannot connect")
    assert "Connection refused" in line
    assert "\t" not in line


def test_listen_fails_fast_when_it_never_connected() -> None:
    """A mistyped DSN is an error at once; only a connection that worked is retried."""
    assert_one_line_error(cli("listen", "--dsn", UNREACHABLE), "cannot connect")


@pytest.mark.parametrize("command", ["status", "listen"])
def test_not_migrated(empty_db: Database, command: str) -> None:
    assert_one_line_error(cli(command, "--dsn", empty_db.dsn), "cqrs-pg migrate", empty_db.name)


def test_listen_unknown_projection(db: Database) -> None:
    assert_one_line_error(cli("listen", "--dsn", db.dsn, "--projection", "nope"), "unknown projection", "nope")


@pytest.mark.parametrize("command", [["status"], ["parked"], ["verify"], ["prune", "--dry-run"],
                                     ["retry", "order_summary"], ["rebuild", "order_summary"]])
def test_a_login_without_the_privilege_gets_one_line(db: Database, login_as: Callable[..., str],
                                                      command: list[str]) -> None:
    """The server's refusal as one line with its SQLSTATE, saying what to connect as."""
    dsn = make_conninfo(db.dsn, user=login_as("cqrs_reader"))
    assert_one_line_error(cli(*command, "--dsn", dsn), "permission denied", "[SQLSTATE 42501]", "connect as")


@pytest.mark.parametrize(("args", "fragment"), [
    (["skip", "order_summary", "--position", str(2**63)], "--position"),
    (["rebuild", "order_summary", "--batch-size", str(2**31)], "--batch-size"),
    (["prune", "--keep", "3000000000d"], "at most 36500d"),
    (["listen", "--prune-keep", "99999999999999d"], "at most 36500d"),
])
def test_values_beyond_what_the_server_takes_are_refused_first(db: Database, args: list[str], fragment: str) -> None:
    """Refused by the command line in one line, before anything reaches the server."""
    proc = cli(*args, "--dsn", db.dsn)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert fragment in proc.stderr.splitlines()[-1], proc.stderr
    with db.connect() as conn:
        assert scalar(conn, "SELECT count(*) FROM cqrs.rebuilds") == 0


def test_dev_up_without_binaries(tmp_path: Path) -> None:
    bindir, root = tmp_path / "bin", tmp_path / "cluster"
    bindir.mkdir()
    proc = cli("dev", "up", "--root", str(root), env={"CQRS_PG_BINDIR": str(bindir)})
    assert_one_line_error(proc, "binaries not found", str(bindir))
    assert not root.exists()


# -- 8. --help and --version --------------------------------------------------------------


def command_paths(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, ctx, (*prefix, name))


def test_help_of_every_command() -> None:
    """Every command answers --help, the development tools' too (installed for the tests)."""
    paths = list(command_paths(main, click.Context(main)))
    expected = {("migrate",), ("listen",), ("status",), ("rebuild",),
                ("dev", "up"), ("dev", "down"), ("dev", "status"), ("demo",), ("soak",), ("bench",)}
    assert expected <= set(paths)
    group_help = invoke("--help").output
    assert group_help.startswith("Usage:")
    for (name,) in [p for p in paths if len(p) == 1]:
        assert name in group_help, (name, group_help)
    for path in paths:
        result = invoke(*path, "--help")
        assert result.output.startswith("Usage:"), (path, result.output)
        assert " ".join(path) in result.output.splitlines()[0], (path, result.output)


def test_a_development_tool_not_installed_says_where_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tools package, `cqrs-pg demo` says how to install it, in one line."""
    import cqrs_pg.cli

    monkeypatch.setattr(cqrs_pg.cli, "entry_points", lambda group: [])
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: cqrs-pg demo is a development tool, not installed: {cqrs_pg.cli.TOOLS_HINT}"


def test_version() -> None:
    assert invoke("--version").output == f"cqrs-pg, version {__version__}\n"
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cqrs-pg, version {__version__}"
