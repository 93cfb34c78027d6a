"""The one test support: what the tests, the bench, the chaos run and the demo need to run
cqrs_pg against real servers, and the helpers the test modules share (they never import
each other, nor tests/conftest.py, which holds only pytest fixtures).

- ``REPO``: the checkout's root (its docs, sql/ and README), looked up on first use.
- ``make_root``: a directory the ``postgres`` OS user can enter (the servers run as it);
  ``throwaway_cluster``: a primary and streaming replicas under one, for a with-block.
- ``Database``: one database on a primary and, replicated, on its replica; it can drain its
  projections as the daemon would and wait for a token to be caught up.
- ``create_template`` / ``clone`` / ``drop``: a database migrated once (the engine and the
  example), and cheap copies of it; ``wait_for_database``: until the replica has a new one;
  ``new_database``: a clone for one test, dropped afterwards.
- ``running_daemon``: the daemon in a thread of this process; ``DaemonProcess``:
  ``cqrs-pg listen`` as a child process, restarted the way systemd would; ``Daemon``: one
  for a test, whose waits fail the test.
- ``wait_until``: poll a condition, failing with what was awaited.
- For tests: reading (``scalar``, ``applied_counts``), the shop's commands (``call``,
  ``run``, ``row_locked``, ``seed_shop``, ``place``), psql / pg_dump / the README, a
  user's alembic project (``alembic_project``), ``cqrs-pg`` as a process (``cli``, ``assert_one_line_error``), the tutorial's projection
  (``Subject``, ``block``, ``mismatches``) and a concurrent ``Reader`` of a read model.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

import cqrs_pg
from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg.db import scalar  # re-exported: the tests read single values with it too
from cqrs_pg.migrate import migrate
from cqrs_pg.projections import handler_for, run_batch
from cqrs_pg_tools.devcluster import DevCluster, find_bindir

# -- paths --------------------------------------------------------------------------------

# The directory holding the cqrs_pg package: a child `python -m cqrs_pg` runs this very
# code, whatever its working directory or what else is installed.
PACKAGE_ROOT = str(Path(cqrs_pg.__file__).resolve().parent.parent)


@functools.cache
def repo_root() -> Path:
    """The repository root, from this file (tools/cqrs_pg_tools/ in it): the tools are only
    installed editable from a checkout, whatever the working directory."""
    root = Path(__file__).resolve().parent.parent.parent
    if not ((root / "pyproject.toml").is_file() and (root / "sql").is_dir()):
        raise RuntimeError(f"{root} is no cqrs_pg checkout (no pyproject.toml and sql/): "
                           "install the tools from one, `python3 -m pip install -e tools`")
    return root


def __getattr__(name: str) -> Path:
    # REPO looked up on first use: the bench, chaos and the demo need no checkout's files.
    if name == "REPO":
        return repo_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- clusters -----------------------------------------------------------------------------


def make_root(prefix: str) -> Path:
    """A new directory under /tmp that the postgres OS user can enter: pytest's own
    temporary directories are mode 700 under root's."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


@dataclass
class Throwaway:
    """What throwaway_cluster yields: the cluster and the directory it lives under."""

    cluster: DevCluster
    root: Path
    keep_files: bool = False  # set to leave root on disk (a failed run's logs)


@contextmanager
def throwaway_cluster(prefix: str, root: Path | None = None, *, replicas: int = 1, keep_running: bool = False,
                      announce: Callable[[Path], None] | None = None) -> Iterator[Throwaway]:
    """A primary and `replicas` streaming replicas under root/cluster (root: a new
    make_root(prefix) unless given), stopped on exit, and root removed if made here.
    keep_running leaves both (`cqrs-pg demo --keep`); announce(root) runs before the start."""
    made = root is None
    root = make_root(prefix) if root is None else root
    handle = Throwaway(DevCluster(root / "cluster"), root)
    try:
        if announce is not None:
            announce(root)
        handle.cluster.up(replicas=replicas)
        yield handle
    finally:
        if not keep_running:
            try:
                handle.cluster.down()
            finally:
                if made and not handle.keep_files:
                    shutil.rmtree(root, ignore_errors=True)


# -- waiting ------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], what: str = "a condition", timeout: float = 30.0,
               interval: float = 0.02, raises: Callable[[str], BaseException] = AssertionError) -> None:
    """Poll predicate until it is true; after timeout seconds raise `raises` naming `what`
    (a tool passes its own error, one its command line reports in one line)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise raises(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- databases ----------------------------------------------------------------------------


def outbox_count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Database:
    """One database, on a primary and (replicated) on its replica."""

    name: str
    dsn: str
    replica_dsn: str

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def connect_replica(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.replica_dsn, autocommit=True, **kwargs)

    def run_projections(self, rounds: int = 100, batch_size: int = 1000) -> int:
        """Apply every pending event synchronously, as the daemon would, in batches of up
        to batch_size; returns the count."""
        total = 0
        with self.connect() as conn:
            projections = conn.execute("SELECT name, kind FROM cqrs.projections").fetchall()
            for _ in range(rounds):
                applied = sum(_run_projection(conn, name, kind, batch_size) for name, kind in projections)
                total += applied
                if not applied:
                    return total
        raise AssertionError("projections did not drain")

    def wait_caught_up(self, token: int, timeout: float = 30.0, replica: bool = True, interval: float = 0.01,
                       raises: Callable[[str], BaseException] = AssertionError) -> None:
        """Until cqrs.caught_up(token) holds on the replica (or the primary); see wait_until."""
        with self.connect_replica() if replica else self.connect() as conn:
            wait_until(lambda: scalar(conn, "SELECT cqrs.caught_up(%s)", (token,)),
                       f"token {token} to be caught up", timeout, interval, raises)


def _run_projection(conn: psycopg.Connection, name: str, kind: str, batch_size: int) -> int:
    if kind == "python":  # its handler, registered in this process
        handler = handler_for(name)
        assert handler is not None, f"no handler registered for python projection {name!r}"
        return run_batch(conn, name, handler, batch_size).applied
    return int(scalar(conn, "SELECT applied FROM cqrs.run_projection(%s, %s, '0 s')", (name, batch_size)))


def create_template(admin_dsn: str, dsn_of: Callable[[str], str], name: str, example: str | None = "shop") -> str:
    """A database migrated to head (the engine, and with example that example): the one a
    tool runs in, or a template for clone() to copy (migrating once, not once per test)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(dsn_of(name), example=example)
    return name


def clone(admin_dsn: str, template: str | None, name: str) -> None:
    """A new database: a copy of template, or empty (template None)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))


def drop(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_for_database(dsn: str, timeout: float = 30.0) -> None:
    """A database created on the primary exists on the replica once its WAL is replayed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


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


# -- daemons ------------------------------------------------------------------------------


@contextmanager
def running_daemon(dsn: str, **overrides: Any) -> Iterator[Listener]:
    """The daemon (cqrs_pg.daemon.Listener) in a thread of this process, stopped on exit.
    A view refreshes every 0.1 s unless overridden."""
    config = ListenerConfig(dsn=dsn, **{"refresh_interval": 0.1, **overrides})
    listener = Listener(config)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "daemon did not stop"


class DaemonProcess:
    """`cqrs-pg listen` (or another long-running command: `relay`) as a child process,
    restarted the way systemd would; everything it writes (its log) is appended to `log`,
    across restarts."""

    def __init__(self, dsn: str, log: Path, *args: str, command: str = "listen") -> None:
        self.dsn = dsn
        self.log = log
        self.args = args
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cqrs_pg", self.command, "--dsn", self.dsn, *self.args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def output(self) -> str:
        """What it has written so far."""
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to finish a batch or say goodbye."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, signum: int, timeout: float = 30.0) -> int | None:
        """Send signum and wait for the exit: its code; None if it still runs after timeout
        (or never started)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, and SIGKILL if it has not exited within timeout: its exit code (None:
        killed, or never started)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        code = self.signal(signal.SIGTERM, timeout)
        if code is None:
            self.kill()
        return code


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


# -- reading the example's projections ----------------------------------------------------

PROJECTIONS = ("order_summary", "customer_stats", "product_sales")
NO_MISMATCH = dict.fromkeys(PROJECTIONS, 0)


def applied_counts(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())


# -- the shop's commands ------------------------------------------------------------------
# ShopWorkload (workload.py) sends its commands with untyped parameters and reads only
# (aggregate_id, token, duplicate); these check each command's exact signature and receipt.

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


def new_customer(conn: psycopg.Connection, name: str = "Customer") -> int:
    """Registers a customer under a fresh email; returns the command's token."""
    return run(conn, "register_customer", f"{uuid.uuid4().hex[:10]}@example.com", name).token


def line(sku: str, quantity: Any) -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity}


@contextmanager
def row_locked(db: Database, sku: str) -> Iterator[None]:
    """Holds a lock on a product row, so a command that needs it waits until we let go."""
    with db.connect() as conn:
        with conn.transaction():
            conn.execute("SELECT 1 FROM shop.products WHERE sku = %s FOR UPDATE", (sku,))
            yield


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
    order: uuid.UUID = scalar(
        conn,
        "SELECT aggregate_id FROM shop.place_order(gen_random_uuid(), %s, %s)",
        (customer, Jsonb([{"sku": sku, "quantity": quantity}, {"sku": "SUITE-2", "quantity": 1}])),
    )
    return order



def skip_to_next_partition(conn: psycopg.Connection) -> None:
    """Moves the outbox's sequence into the next partition (positions no event took, as
    a rolled-back transaction leaves them), partitions kept ahead first as the daemon
    keeps them: a partition's worth of history without a million events."""
    conn.execute("SELECT cqrs.extend_outbox()")
    last = scalar(conn, "SELECT last_value FROM cqrs.outbox_position_seq")
    conn.execute("SELECT setval('cqrs.outbox_position_seq', %s)", ((last // 1_000_000 + 1) * 1_000_000 + 10,))

# -- psql, pg_dump, the README and a user's alembic project -------------------------------


def readme_block(marker: str) -> str:
    """The README's SQL example marked `<!-- readme-test: MARKER -->`."""
    readme = (repo_root() / "README.md").read_text()
    match = re.search(rf"<!-- readme-test: {marker} -->\n```sql\n(.*?)```", readme, re.S)
    assert match, f"README lost its {marker} example"
    return match.group(1)


def psql_binary() -> str:
    """The psql client: on PATH, else beside the server binaries."""
    return shutil.which("psql") or str(find_bindir() / "psql")


def psql_process(dsn: str, script: str, *variables: str, stop_on_error: bool = True) -> subprocess.CompletedProcess[str]:
    """The script run by the real psql client, unaligned and tuples only, with psql's
    default verbosity and context (no ~/.psqlrc); each variable is NAME=VALUE."""
    args = [psql_binary(), dsn, "-X", "-A", "-t"]
    for variable in (*(["ON_ERROR_STOP=1"] if stop_on_error else []), *variables):
        args += ["-v", variable]
    return subprocess.run(args, input=script, capture_output=True, text=True, timeout=60)


def psql(dsn: str, script: str, *variables: str) -> str:
    """The script run by the real psql client (stopping at the first error); its output."""
    done = psql_process(dsn, script, *variables)
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


def alembic_project(directory: Path, env_py: str, versions: dict[str, str]) -> Any:
    """A user's alembic project as the tutorials show one: their env.py, and
    versions/NAME files; returns the alembic Config for alembic.command to run it."""
    from alembic.config import Config

    (directory / "versions").mkdir(parents=True)
    (directory / "env.py").write_text(env_py)
    for name, text in versions.items():
        (directory / "versions" / name).write_text(text)
    config = Config()
    config.set_main_option("script_location", str(directory))
    return config


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
        cwd=repo_root(),
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


# -- the tutorial's projection (docs/adding-a-projection.md) ------------------------------
# Installed from the tutorial's own code blocks, so the tutorial is what is tested.

NAME = "customer_orders_by_status"
TABLES = ("shop_read.customer_orders_by_status", "shop_proj.customer_orders_by_status_orders")

# What each kind runs, in order, to install the projection.
INSTALL = {
    "sql": ("step 1", "step 2", "step 3", "step 4"),
    "python": ("step 1", "python step 3", "step 4", "python step 5"),
}


def _tutorial() -> Path:
    return repo_root() / "docs" / "adding-a-projection.md"


def block(name: str) -> str:
    """The tutorial's code block marked `<!-- tutorial: NAME -->`."""
    pattern = r"<!-- tutorial: ([\w ]+?) -->\n```(?:sql|python)\n(.*?)```"
    blocks: dict[str, str] = dict(re.findall(pattern, _tutorial().read_text(), re.S))
    assert name in blocks, f"docs/adding-a-projection.md lost its '{name}' block"
    return blocks[name]


@functools.cache
def load_tutorial_handler() -> types.ModuleType:
    """The tutorial's handler module, executed once: it registers the python handler."""
    module = types.ModuleType("tutorial_projections")
    exec(compile(block("python handler"), str(_tutorial()), "exec"), module.__dict__)
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


# -- a concurrent reader ------------------------------------------------------------------


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
                    self.counts.append(scalar(conn, self.query))
                except psycopg.Error as exc:
                    self.errors.append(f"{exc.sqlstate}: {exc}")

    def never_shrank(self) -> bool:
        return all(b >= a for a, b in itertools.pairwise(self.counts))

    def finish(self) -> None:
        """Stop, then: no error, never empty, never a drop."""
        self.stop.set()
        self.join()
        assert not self.errors, self.errors[:3]
        assert self.counts and min(self.counts) > 0, f"{self.query}: the read model was seen empty"
        assert self.never_shrank(), f"{self.query}: went back {self.counts}"
