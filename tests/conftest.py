"""Shared fixtures: one real primary + streaming replica per test session, a database
migrated once as a template (the engine and the example), and a fresh clone of it per
test. The machinery is cqrs_pg_tools.testing, which the bench, the chaos run and the demo
share.

Test modules never import each other: what more than one of them needs is here, imported
from tests.conftest (calling the shop's commands, psql, `cqrs-pg` as a process, daemons as
processes, and the tutorial's projection of docs/adding-a-projection.md)."""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
from cqrs_pg_tools.devcluster import DevCluster, find_bindir
from cqrs_pg_tools.testing import (
    DaemonProcess,
    Database,
    clone,
    create_template,
    drop,
    throwaway_cluster,
    wait_for_database,
    wait_until,
)
from psycopg.types.json import Jsonb

from cqrs_pg.projections import handler_for, run_batch

TEMPLATE = "cqrs_template"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    with throwaway_cluster("cqrs-pg-tests-") as throwaway:
        yield throwaway.cluster


@pytest.fixture(scope="session")
def template(cluster: DevCluster) -> str:
    """A database migrated to head once per session, cloned by every test."""
    return create_template(cluster.primary_dsn(), cluster.primary_dsn, TEMPLATE)


def new_database(cluster: DevCluster, template: str | None) -> Iterator[Database]:
    """A database of its own (a clone of template, or empty), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    clone(cluster.primary_dsn(), template, name)
    db = Database(name, cluster.primary_dsn(name), cluster.replica_dsn(name))
    wait_for_database(db.replica_dsn)
    try:
        yield db
    finally:
        drop(cluster.primary_dsn(), name)


@pytest.fixture
def db(cluster: DevCluster, template: str) -> Iterator[Database]:
    """A migrated database of its own, cloned from the session template."""
    yield from new_database(cluster, template)


@pytest.fixture
def empty_db(cluster: DevCluster) -> Iterator[Database]:
    """An empty database (no schema), for migration tests."""
    yield from new_database(cluster, None)


@pytest.fixture(autouse=True)
def _no_ambient_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests say which database they use; a DSN exported in the shell must not leak in.
    for var in ("CQRS_PG_DSN", "CQRS_PG_REPLICA_DSN"):
        monkeypatch.delenv(var, raising=False)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


# -- reading ------------------------------------------------------------------------------


def scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


PROJECTIONS = ("order_summary", "customer_stats", "product_sales")
NO_MISMATCH = dict.fromkeys(PROJECTIONS, 0)


def applied_counts(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())


# -- the shop's commands ------------------------------------------------------------------

# Argument types of each command after command_id, in order: casts in the call pick the
# exact overload whatever Python type psycopg would send.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "register_customer": ("text", "text"),
    "rename_customer": ("uuid", "text", "integer"),
    "add_product": ("text", "text", "bigint", "integer"),
    "restock": ("text", "integer"),
    "change_price": ("text", "bigint"),
    "place_order": ("uuid", "jsonb"),
    "cancel_order": ("uuid", "integer"),
    "ship_order": ("uuid", "integer"),
}


class Receipt(NamedTuple):
    command_id: uuid.UUID
    aggregate_id: uuid.UUID
    version: int
    token: int
    duplicate: bool


def _param(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, (list, dict)) else value


def call(conn: psycopg.Connection, command: str, command_id: uuid.UUID | None, *args: Any) -> Receipt:
    """SELECT * FROM shop.<command>(command_id, args...): exactly one receipt row."""
    types_ = ("uuid", *SIGNATURES[command])
    assert len(args) + 1 == len(types_), f"{command} takes {len(types_)} arguments"
    placeholders = ", ".join(f"%s::{t}" for t in types_)
    rows = conn.execute(
        f"SELECT * FROM shop.{command}({placeholders})", (command_id, *map(_param, args))
    ).fetchall()
    assert len(rows) == 1, rows
    return Receipt(*rows[0])


def run(conn: psycopg.Connection, command: str, *args: Any) -> Receipt:
    """Runs a command under a fresh command_id and checks the receipt's generic shape."""
    command_id = uuid.uuid4()
    r = call(conn, command, command_id, *args)
    assert r.command_id == command_id
    assert r.token > 0
    assert r.duplicate is False
    return r


def line(sku: str, quantity: Any) -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity}


@contextmanager
def row_locked(db: Database, sku: str) -> Iterator[None]:
    """Holds a lock on a product row, so a command that needs it waits until we let go."""
    with db.connect() as conn:
        with conn.transaction():
            conn.execute("SELECT 1 FROM shop.products WHERE sku = %s FOR UPDATE", (sku,))
            yield


# -- psql, pg_dump and the README ---------------------------------------------------------


def readme_block(marker: str) -> str:
    """The README's SQL example marked `<!-- readme-test: MARKER -->`."""
    match = re.search(rf"<!-- readme-test: {marker} -->\n```sql\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert match, f"README lost its {marker} example"
    return match.group(1)


def psql(dsn: str, script: str, *variables: str) -> str:
    """The script run by the real psql client (stopping at the first error); its output."""
    binary = shutil.which("psql") or str(find_bindir() / "psql")
    args = [binary, dsn, "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t"]
    for variable in variables:
        args += ["-v", variable]
    done = subprocess.run(args, input=script, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def schema_dump(cluster: DevCluster, dbname: str) -> str:
    """pg_dump --schema-only of a database, without what differs between two dumps."""
    port = cluster.status()[0].port
    dump = subprocess.run(
        [str(find_bindir() / "pg_dump"), "--schema-only", "--no-owner", "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "--exclude-table=public.alembic_version", dbname],
        capture_output=True, text=True, check=True,
    ).stdout
    # comments, and the random key of pg_dump's \\restrict guard, differ between dumps
    return re.sub(r"^(--.*|\\(un)?restrict .*)$", "", dump, flags=re.M)


# -- `cqrs-pg` as a process ---------------------------------------------------------------

UNREACHABLE = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m cqrs_pg ARGS` as a real process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "cqrs_pg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 1, no traceback, exactly one `Error:` line on stderr (log records of the
    daemon aside) naming every fragment; returns that line."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 1, everything
    assert "Traceback" not in everything, everything
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    assert all(LOG_LINE.match(line) for line in lines[:-1]), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class Daemon(DaemonProcess):
    """A `cqrs-pg listen` process on a test database, started at once (polling every 0.2 s),
    with waits that fail the test and show its log."""

    def __init__(self, db: Database, log: Path, *extra: str) -> None:
        super().__init__(db.dsn, log, "--poll-interval", "0.2", *extra)
        self.start()

    def registered(self, conn: psycopg.Connection) -> bool:
        """True once the daemon has its row in cqrs.listeners (its signal handlers are set)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"listen exited with {self.proc.returncode}:\n{self.output}")
        mine = f"%:{self.proc.pid}:%"  # listener_id is host:pid:random
        return bool(scalar(conn, "SELECT count(*) FROM cqrs.listeners WHERE listener_id LIKE %s", (mine,)))

    def wait_registered(self, conn: psycopg.Connection) -> None:
        wait_until(lambda: self.registered(conn), "the daemon to register in cqrs.listeners")

    def signal(self, signum: int, timeout: float = 10.0) -> int:
        code = super().signal(signum, timeout)
        if code is None:
            name = signal.Signals(signum).name
            raise AssertionError(f"listen did not exit within {timeout:g}s of {name}:\n{self.output}")
        return code


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts listen processes; any still running at the end is killed."""
    started: list[Daemon] = []

    def start(db: Database, *extra: str) -> Daemon:
        daemon = Daemon(db, tmp_path / f"listen-{len(started)}.log", *extra)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


# -- the tutorial's projection (docs/adding-a-projection.md) ------------------------------
# Installed from the tutorial's own code blocks, so the tutorial is what is tested.

TUTORIAL = REPO / "docs" / "adding-a-projection.md"
NAME = "customer_orders_by_status"
TABLES = ("shop_read.customer_orders_by_status", "shop_proj.customer_orders_by_status_orders")

# What each kind runs, in order, to install the projection.
INSTALL = {
    "sql": ("step 1", "step 2", "step 3", "step 4"),
    "python": ("step 1", "python step 3", "step 4", "python step 5"),
}


def block(name: str) -> str:
    """The tutorial's code block marked `<!-- tutorial: NAME -->`."""
    blocks = dict(re.findall(r"<!-- tutorial: ([\w ]+?) -->\n```(?:sql|python)\n(.*?)```", TUTORIAL.read_text(), re.S))
    assert name in blocks, f"docs/adding-a-projection.md lost its '{name}' block"
    return blocks[name]


@functools.cache
def load_tutorial_handler() -> types.ModuleType:
    """The tutorial's handler module, executed once: it registers the python handler."""
    module = types.ModuleType("tutorial_projections")
    exec(compile(block("python handler"), str(TUTORIAL), "exec"), module.__dict__)  # noqa: S102
    assert handler_for(NAME) is not None, "the tutorial's handler module registers no handler"
    return module


def mismatches(conn: psycopg.Connection) -> int:
    """Rows in the tutorial's read table or in the model's definition, but not in both."""
    cols = "customer_id, status, orders, total_cents"
    row = conn.execute(
        f"""WITH expected AS ({block('definition')}),
                 actual AS (SELECT {cols} FROM {TABLES[0]})
            SELECT (SELECT count(*) FROM (SELECT {cols} FROM expected EXCEPT ALL SELECT {cols} FROM actual) a)
                 + (SELECT count(*) FROM (SELECT {cols} FROM actual EXCEPT ALL SELECT {cols} FROM expected) b)"""
    ).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Subject:
    """The tutorial's projection of one kind (`sql` or `python`) in a test's database: how
    to install it and run one batch of it, as the daemon would."""

    db: Database
    kind: str
    name: str = NAME

    def install(self) -> None:
        if self.kind == "python":
            load_tutorial_handler()
        with self.db.connect() as conn:
            for step in INSTALL[self.kind]:
                conn.execute(block(step))

    def run_once(self, conn: psycopg.Connection, max_events: int) -> tuple[int, bool]:
        """One batch, as the daemon runs it: (applied, busy)."""
        if self.kind == "python":
            handler = handler_for(self.name)
            assert handler is not None
            result = run_batch(conn, self.name, handler, max_events)
            return result.applied, result.busy
        row = conn.execute(
            "SELECT applied, busy FROM cqrs.run_projection(%s, %s, '0 s')", (self.name, max_events)
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def drain(self, conn: psycopg.Connection, sizes: tuple[int, int] = (1000, 1000), seed: int = 0) -> int:
        """Batches of random sizes within `sizes` until nothing is left; the batch count.
        After each batch, applied_events must equal the events up to the checkpoint."""
        rng = random.Random(seed)
        batches = 0
        while True:
            applied, busy = self.run_once(conn, rng.randint(*sizes))
            assert not busy
            if not applied:
                return batches
            batches += 1
            assert self.applied(conn) == self.events_to_checkpoint(conn)

    def applied(self, conn: psycopg.Connection) -> int:
        return int(scalar(conn, "SELECT applied_events FROM cqrs.projections WHERE name = %s", (self.name,)))

    def checkpoint(self, conn: psycopg.Connection) -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT last_position, applied_events, horizon::text FROM cqrs.projections WHERE name = %s",
            (self.name,),
        ).fetchone()
        assert row is not None
        return tuple(row)

    def events_to_checkpoint(self, conn: psycopg.Connection) -> int:
        return int(scalar(
            conn,
            "SELECT count(*) FROM cqrs.outbox o, cqrs.projections p"
            " WHERE p.name = %s AND o.position <= p.last_position",
            (self.name,),
        ))

    def cut_inside_a_transaction(self, conn: psycopg.Connection) -> bool:
        """Whether the checkpoint stands inside a transaction: the last event applied has a
        later one of its transaction after it."""
        return bool(scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM cqrs.outbox o, cqrs.outbox l, cqrs.projections p"
            " WHERE p.name = %s AND l.position = (SELECT max(x.position) FROM cqrs.outbox x"
            "                                      WHERE x.position <= p.last_position)"
            " AND o.tx_id = l.tx_id AND o.position > p.last_position)",
            (self.name,),
        ))

    def rows(self, conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the projection's tables, private state included."""
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}

    def reset(self, conn: psycopg.Connection) -> None:
        """Back to no events applied: empty tables, checkpoint at the start."""
        conn.execute(f"TRUNCATE {', '.join(TABLES)}")
        conn.execute(
            "UPDATE cqrs.projections SET last_position = 0, applied_events = 0, horizon = '0'"
            " WHERE name = %s",
            (self.name,),
        )


def seed_shop(conn: psycopg.Connection) -> tuple[uuid.UUID, str]:
    """A customer and two products (SUITE-1, SUITE-2); returns the customer and SUITE-1."""
    customer = scalar(
        conn, "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'suite@example.com', 'Suite')"
    )
    conn.execute("SELECT shop.add_product(gen_random_uuid(), 'SUITE-1', 'Suite product', 250, 1000)")
    conn.execute("SELECT shop.add_product(gen_random_uuid(), 'SUITE-2', 'Another', 40, 1000)")
    return customer, "SUITE-1"


def place(conn: psycopg.Connection, customer: uuid.UUID, sku: str, quantity: int = 1) -> uuid.UUID:
    """An order of `quantity` of sku and one SUITE-2 (seed_shop's); returns its id."""
    return scalar(
        conn,
        "SELECT aggregate_id FROM shop.place_order(gen_random_uuid(), %s, %s)",
        (customer, Jsonb([{"sku": sku, "quantity": quantity}, {"sku": "SUITE-2", "quantity": 1}])),
    )


class Reader(threading.Thread):
    """Runs a query over a read model in a loop: one number that only ever grows while the
    model is whole and current (its row count, its orders), so an empty, half-built or
    older model shows as a drop."""

    def __init__(self, connect: Callable[[], psycopg.Connection], query: str) -> None:
        super().__init__(daemon=True)
        self.connect, self.query = connect, query
        self.stop = threading.Event()
        self.counts: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with self.connect() as conn:
            while not self.stop.is_set():
                try:
                    self.counts.append(conn.execute(self.query).fetchone()[0])
                except psycopg.Error as exc:
                    self.errors.append(f"{exc.sqlstate}: {exc}")

    def never_shrank(self) -> bool:
        return all(b >= a for a, b in zip(self.counts, self.counts[1:]))

    def finish(self) -> None:
        """Stop, then: no error, never empty, never a drop."""
        self.stop.set()
        self.join()
        assert not self.errors, self.errors[:3]
        assert self.counts and min(self.counts) > 0, f"{self.query}: the read model was seen empty"
        assert self.never_shrank(), f"{self.query}: went back {self.counts}"
