"""Reads on the replicas (cqrs_pg.routing.Router) against a real primary with two streaming
replicas, started by `cqrs-pg dev up --replicas 2` for this module: reads spread over both
and survive losing one; read-your-writes 1,000 times in a row with the daemon running;
fallback to the primary; the retry after a real recovery conflict; replica readers running
through >= 50 materialized view refreshes; `cqrs-pg status` listing every replica.

The read-your-writes waits are printed (run with -s to see them), never asserted.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from cqrs_pg.cli import main
from cqrs_pg.errors import (
    ConfigError,
    ConsistencyTimeout,
    NotFound,
    ReplicaUnavailable,
    ValidationError,
)
from cqrs_pg.migrate import migrate
from cqrs_pg.routing import Router, is_recovery_conflict, replica_hosts
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import REPO, Daemon, Database, make_root, scalar, wait_until

# every test here runs on the module's own primary + 2 replicas
pytestmark = pytest.mark.slow

TEMPLATE = "routing_template"


# -- the cluster: primary + 2 replicas ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster2() -> Iterator[DevCluster]:
    base = make_root("cqrs-pg-routing-")
    root = base / "c"
    try:
        result = CliRunner().invoke(main, ["dev", "up", "--root", str(root), "--replicas", "2"])
        assert result.exit_code == 0, result.output
        assert "CQRS_PG_REPLICA_DSN" in result.stdout
        dc = DevCluster(root)
        with psycopg.connect(dc.primary_dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        migrate(dc.primary_dsn(TEMPLATE), example="shop")
        yield dc
    finally:
        DevCluster(root).down()
        shutil.rmtree(base, ignore_errors=True)


def ports(dc: DevCluster) -> dict[str, int]:
    return {n.name: n.port for n in dc.status()}


def one_replica_dsn(dc: DevCluster, name: str, dbname: str) -> str:
    return f"host=127.0.0.1 port={ports(dc)[name]} dbname={dbname} user=postgres"


@pytest.fixture
def db(cluster2: DevCluster) -> Iterator[Database]:
    """A migrated database of its own, present on both replicas."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster2.primary_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    for replica in ("replica1", "replica2"):
        wait_until(lambda r=replica: _connects(one_replica_dsn(cluster2, r, name)), f"{name} on {replica}")
    yield Database(name, cluster2.primary_dsn(name), cluster2.replica_dsn(name))
    with psycopg.connect(cluster2.primary_dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _connects(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture
def routers() -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def make(*args: Any, **kwargs: Any) -> Router:
        router = Router(*args, **kwargs)
        made.append(router)
        return router

    yield make
    for router in made:
        router.close()


def set_replica(dc: DevCluster, name: str, **settings: str | None) -> None:
    """ALTER SYSTEM on a replica (None: RESET), reloaded, and seen by new sessions."""
    dsn = one_replica_dsn(dc, name, "postgres")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, value in settings.items():
            if value is None:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key)))
            else:
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(key), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")

    def applied() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return all(
                value is None or scalar(conn, "SELECT current_setting(%s)", (key,)) == value
                for key, value in settings.items()
            )

    wait_until(applied, f"{settings} on {name}")


def customer_and_product(router: Router, stock: int = 1_000_000) -> tuple[uuid.UUID, str]:
    customer = router.command("shop.register_customer", f"{uuid.uuid4().hex}@example.com", "Ada").aggregate_id
    sku = f"SKU-{uuid.uuid4().hex[:8]}"
    router.command("shop.add_product", sku, "Tea", 250, stock)
    return customer, sku


def server_port(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SELECT inet_server_port()"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- spreading, losing a replica ------------------------------------------------------------


def test_reads_spread_over_both_replicas_and_survive_losing_one(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router]
) -> None:
    p = ports(cluster2)
    router = routers(db.dsn, db.replica_dsn, fallback="error", recheck_interval=0.5)
    assert [h.label for h in replica_hosts(db.replica_dsn)] == [f"127.0.0.1:{p['replica1']}", f"127.0.0.1:{p['replica2']}"]
    seen = [router.read(server_port) for _ in range(20)]
    assert {port: seen.count(port) for port in set(seen)} == {p["replica1"]: 10, p["replica2"]: 10}

    # Reads keep running, without an error, while replica1 goes away: short ones in a loop,
    # and one that is running on replica1 when it stops (it runs again on replica2).
    stop = threading.Event()
    errors: list[BaseException] = []
    served: list[int] = []
    in_flight = threading.Event()
    long_read: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                served.append(router.read(server_port))
            except BaseException as exc:  # noqa: BLE001  (any error fails the test)
                errors.append(exc)
            time.sleep(0.005)

    def slow_on_replica1(conn: psycopg.Connection) -> int:
        port = server_port(conn)
        long_read.append(port)
        if port == p["replica1"]:
            in_flight.set()
            conn.execute("SELECT pg_sleep(60)")
        return port

    def long_reader() -> None:
        try:
            while not in_flight.is_set() and not stop.is_set():
                router.read(slow_on_replica1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=long_reader)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(served) >= 20 and in_flight.is_set(), "reads before the stop")
        cluster2.stop_node("replica1")
        mark = len(served)
        wait_until(lambda: len(served) >= mark + 50, "reads after the stop")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        cluster2.start_node("replica1")
    assert not errors, errors
    assert set(served[mark:]) == {p["replica2"]}
    assert long_read[-2:] == [p["replica1"], p["replica2"]]
    assert dict(router.replicas())[f"127.0.0.1:{p['replica1']}"] == "down"

    # Back: after recheck_interval the next read probes it and it takes reads again.
    cluster2.wait_replicas_streaming(timeout=60)
    wait_until(lambda: router.read(server_port) == p["replica1"], "a read on replica1 again", interval=0.1)


# -- read-your-writes --------------------------------------------------------------------------


def test_a_consistent_read_sees_its_own_command_1000_times_in_a_row(
    db: Database, routers: Callable[..., Router], daemons: Callable[..., Daemon]
) -> None:
    # Replicas only: a read the replicas could not serve must fail the test, not hide on the primary.
    router = routers(db.dsn, db.replica_dsn, fallback="error", on_stale="error", wait_timeout=30)
    customer, sku = customer_and_product(router)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        daemons(db).wait_registered(conn)
    waits: dict[str, list[float]] = {"order_summary": [], "customer_stats": []}
    ports_seen = set()
    for i in range(1000):
        quantity = i % 7 + 1
        receipt = router.command("shop.place_order", customer, [{"sku": sku, "quantity": quantity}])
        started = time.perf_counter()
        if i % 2 == 0:
            row = router.fetchone(
                "SELECT item_count, inet_server_port() FROM shop_read.order_summary WHERE order_id = %s",
                (receipt.aggregate_id,),
                consistent_with=receipt.token,
                projection="order_summary",
            )
            waits["order_summary"].append(time.perf_counter() - started)
            assert row is not None and row[0] == quantity, f"read {i}: {row}"
        else:
            row = router.fetchone(
                "SELECT orders_placed, inet_server_port() FROM shop_read.customer_stats WHERE customer_id = %s",
                (customer,),
                consistent_with=receipt.token,
                projection="customer_stats",
            )
            waits["customer_stats"].append(time.perf_counter() - started)
            assert row is not None and row[0] == i + 1, f"read {i}: {row}"
        ports_seen.add(row[1])
    assert len(ports_seen) == 2  # both replicas served consistent reads
    everything = waits["order_summary"] + waits["customer_stats"]
    print(
        f"\nread-your-writes wait (command returned -> consistent replica read returned), {len(everything)} reads: "
        f"p50 {percentile(everything, 0.5) * 1000:.1f} ms, p99 {percentile(everything, 0.99) * 1000:.1f} ms, "
        f"max {max(everything) * 1000:.1f} ms"
    )


def test_read_your_writes_on_the_materialized_view_and_its_refresh_interval(
    db: Database, routers: Callable[..., Router], daemons: Callable[..., Daemon]
) -> None:
    interval = 0.3
    router = routers(db.dsn, db.replica_dsn, fallback="error", on_stale="error", wait_timeout=30)
    customer, sku = customer_and_product(router)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        daemons(db, "--refresh-interval", str(interval)).wait_registered(conn)
        refreshes = []
        waits = []
        for i in range(1, 16):
            receipt = router.command("shop.place_order", customer, [{"sku": sku, "quantity": 1}])
            started = time.perf_counter()
            units = router.fetchone(
                "SELECT units_sold FROM shop_read.product_sales WHERE sku = %s",
                (sku,),
                consistent_with=receipt.token,
                projection="product_sales",
            )
            waits.append(time.perf_counter() - started)
            assert units == (i,)
            refreshes.append(scalar(conn, "SELECT refreshed_at FROM cqrs.projections WHERE name = 'product_sales'"))
    # Never refreshed more often than --refresh-interval (refreshed_at is the refresh's now()).
    distinct = sorted(set(refreshes))
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(distinct)]
    assert len(distinct) == 15 and min(gaps) >= interval, gaps
    print(f"\nproduct_sales read-your-writes wait at --refresh-interval {interval}: "
          f"p50 {percentile(waits, 0.5) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms")


def test_a_stale_replica_reads_from_the_primary_or_raises(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router]
) -> None:
    primary_port = ports(cluster2)["primary"]
    setup = routers(db.dsn)
    customer, _ = customer_and_product(setup)
    db.run_projections()
    replicas = [one_replica_dsn(cluster2, name, db.name) for name in ("replica1", "replica2")]
    for dsn in replicas:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
    try:
        receipt = setup.command("shop.rename_customer", customer, "Grace")
        query = "SELECT name, inet_server_port() FROM shop_read.customer_stats WHERE customer_id = %s"

        # Not applied anywhere yet: both choices end in ConsistencyTimeout.
        for on_stale in ("primary", "error"):
            router = routers(db.dsn, db.replica_dsn, on_stale=on_stale, wait_timeout=0.3)
            with pytest.raises(ConsistencyTimeout, match=str(receipt.token)):
                router.fetchone(query, (customer,), consistent_with=receipt.token)

        db.run_projections()  # applied on the primary; the paused replicas never see it
        stale = routers(db.dsn, db.replica_dsn, on_stale="error", wait_timeout=0.3)
        with pytest.raises(ConsistencyTimeout, match=re.escape("replica 127.0.0.1")):
            stale.fetchone(query, (customer,), consistent_with=receipt.token)
        fresh = routers(db.dsn, db.replica_dsn, on_stale="primary", wait_timeout=0.3)
        assert fresh.fetchone(query, (customer,), consistent_with=receipt.token) == ("Grace", primary_port)
        # A read that names no token is not held back by the paused replay.
        assert fresh.fetchone(query, (customer,))[0] == "Ada"
    finally:
        for dsn in replicas:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_wal_replay_resume()")


def test_bad_tokens_and_projections_raise_their_errors(db: Database, routers: Callable[..., Router]) -> None:
    router = routers(db.dsn, db.replica_dsn)
    with pytest.raises(ValidationError, match="-1"):
        router.fetchone("SELECT 1", consistent_with=-1)
    with pytest.raises(NotFound, match="nope"):
        router.fetchone("SELECT 1", consistent_with=1, projection="nope")
    with pytest.raises(ValidationError):
        router.command("shop.register_customer", "not an email", "X")
    with pytest.raises(ValueError, match="projection"):
        router.fetchone("SELECT 1", projection="order_summary")
    for token in (2**63, "abc", 1.5, True):
        with pytest.raises(ValidationError, match="consistent_with must be a command's token"):
            router.fetchone("SELECT 1", consistent_with=token)
    for timeout in (float("nan"), float("inf"), -1, "5"):  # nan used to poll forever
        with pytest.raises(ConfigError, match="timeout must be a finite number"):
            router.fetchone("SELECT 1", consistent_with=1, timeout=timeout)


# -- fallback ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fallback_to_the_primary_allowed_or_an_error(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router]
) -> None:
    primary_port = ports(cluster2)["primary"]
    # Nothing listens on one port; the other is the primary, which target_session_attrs=standby refuses.
    nobody = f"host=127.0.0.1,127.0.0.1 port={closed_port()},{primary_port} dbname={db.name} user=postgres"

    allowed = routers(db.dsn, nobody, fallback="primary")
    assert allowed.read(lambda conn: (server_port(conn), scalar(conn, "SELECT pg_is_in_recovery()"))) == (primary_port, False)
    assert [state for _, state in allowed.replicas()] == ["down", "down"]

    refused = routers(db.dsn, nobody, fallback="error")
    with pytest.raises(ReplicaUnavailable, match=f"127.0.0.1:{primary_port}"):
        refused.read(server_port)

    # No replica DSN at all: reads go to the primary, by configuration, not as a fallback.
    assert routers(db.dsn, fallback="error").read(server_port) == primary_port


def test_reads_at_once_on_a_new_router_wait_for_the_replica_probe(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router]
) -> None:
    """Reads that find a replica being probed by another thread wait for the probe's answer,
    rather than skip a replica nobody has found down (with fallback="error": raise)."""
    replica_port = ports(cluster2)["replica1"]
    def read(router: Router, start: threading.Barrier) -> int:
        start.wait()
        return router.read(server_port)

    for _ in range(3):
        router = routers(db.dsn, one_replica_dsn(cluster2, "replica1", db.name), fallback="error")
        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(read, [router] * 8, [start] * 8)) == [replica_port] * 8


def test_bad_router_options_name_the_value(db: Database) -> None:
    with pytest.raises(ConfigError, match="'sometimes'"):
        Router(db.dsn, fallback="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wait_timeout"):
        Router(db.dsn, wait_timeout=0)
    with pytest.raises(ConfigError, match="2 port values for 3 hosts"):
        Router(db.dsn, "host=a,b,c port=1,2")


# -- recovery conflicts -------------------------------------------------------------------------


def test_a_read_cancelled_by_a_real_recovery_conflict_is_retried_once(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router]
) -> None:
    # replica2 as PostgreSQL ships it: no feedback to the primary, and a replay that waits
    # for no query. A VACUUM on the primary then cancels replica2's older snapshots.
    set_replica(cluster2, "replica2", hot_standby_feedback="off", max_standby_streaming_delay="0")
    replica2 = one_replica_dsn(cluster2, "replica2", db.name)
    try:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE conflict_probe AS SELECT g AS id FROM generate_series(1, 1000) g")
        wait_until(lambda: _has_table(replica2, "conflict_probe"), "conflict_probe on replica2")

        router = routers(db.dsn, replica2, fallback="error")
        attempts: list[str] = []
        long_query_started = threading.Event()

        def read(conn: psycopg.Connection) -> int:
            if not attempts:
                attempts.append("long")
                long_query_started.set()
                try:
                    # Holds a snapshot from before the DELETE below for up to a minute.
                    return int(scalar(conn, "SELECT count(*) FROM conflict_probe, pg_sleep(60) s"))
                except psycopg.Error as exc:
                    attempts[-1] = f"{exc.sqlstate}: {exc.diag.message_primary}"
                    raise
            attempts.append("again")
            return int(scalar(conn, "SELECT count(*) FROM conflict_probe"))

        def vacuum_until_cancelled() -> None:
            long_query_started.wait(30)
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM conflict_probe")
                deadline = time.monotonic() + 60
                while attempts == ["long"] and time.monotonic() < deadline:
                    # Removes the rows once no snapshot on the primary holds them. No
                    # truncation: its lock, replayed, would cancel the retry as well.
                    conn.execute("VACUUM (TRUNCATE false) conflict_probe")
                    time.sleep(0.2)

        vacuum = threading.Thread(target=vacuum_until_cancelled)
        vacuum.start()
        try:
            assert router.read(read) == 0
        finally:
            vacuum.join(timeout=90)
        assert attempts == ["40001: canceling statement due to conflict with recovery", "again"]
    finally:
        set_replica(cluster2, "replica2", hot_standby_feedback=None, max_standby_streaming_delay=None)


def _has_table(dsn: str, table: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (table,))


def test_a_second_conflict_or_another_40001_is_not_retried(db: Database, routers: Callable[..., Router]) -> None:
    router = routers(db.dsn, db.replica_dsn)
    calls = []

    def conflicts(_conn: psycopg.Connection) -> None:
        calls.append(1)
        raise psycopg.errors.SerializationFailure("canceling statement due to conflict with recovery")

    with pytest.raises(psycopg.errors.SerializationFailure) as info:
        router.read(conflicts)
    assert is_recovery_conflict(info.value) and len(calls) == 2

    def serialization(_conn: psycopg.Connection) -> None:
        calls.append(1)
        raise psycopg.errors.SerializationFailure("could not serialize access due to concurrent update")

    calls.clear()
    with pytest.raises(psycopg.errors.SerializationFailure):
        router.read(serialization)
    assert len(calls) == 1


# -- materialized view refreshes under replica readers --------------------------------------------


def test_replica_reads_run_through_50_refreshes_without_an_error(
    cluster2: DevCluster, db: Database, routers: Callable[..., Router], daemons: Callable[..., Daemon]
) -> None:
    # Replay waits for no reader here, so any conflict a refresh caused would cancel a read
    # at once; hot_standby_feedback stays on, as dev up and docs/production.md set it.
    for name in ("replica1", "replica2"):
        set_replica(cluster2, name, max_standby_streaming_delay="0")
    router = routers(db.dsn)
    customer, sku = customer_and_product(router)
    stop = threading.Event()
    errors: list[str] = []
    reads = {"replica1": 0, "replica2": 0}

    def reader(name: str) -> None:
        with psycopg.connect(one_replica_dsn(cluster2, name, db.name), autocommit=True) as conn:
            while not stop.is_set():
                try:
                    conn.execute("SELECT sum(units_sold), count(*) FROM shop_read.product_sales").fetchone()
                    # A read that spans a refresh's replay.
                    conn.execute("SELECT pg_sleep(0.05), sum(revenue_cents) FROM shop_read.product_sales").fetchone()
                    reads[name] += 1
                except psycopg.Error as exc:
                    errors.append(f"{name}: {exc.sqlstate}: {exc}")
                    if conn.broken:
                        return

    def writer() -> None:
        while not stop.is_set():
            router.command("shop.place_order", customer, [{"sku": sku, "quantity": 1}])
            time.sleep(0.01)

    threads = [threading.Thread(target=reader, args=(n,)) for n in reads] + [threading.Thread(target=writer)]
    try:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            daemons(db, "--refresh-interval", "0.1").wait_registered(conn)
            for thread in threads:
                thread.start()
            seen: set[Any] = set()

            def refreshed_50_times() -> bool:
                seen.add(scalar(conn, "SELECT refreshed_at FROM cqrs.projections WHERE name = 'product_sales'"))
                return len(seen - {None}) >= 51  # the first one seen may predate the readers

            wait_until(refreshed_50_times, "50 refreshes of product_sales", timeout=300)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for name in ("replica1", "replica2"):
            set_replica(cluster2, name, max_standby_streaming_delay=None)
    assert not errors, errors[:5]
    assert all(n > 0 for n in reads.values()), reads


# -- status over both replicas ---------------------------------------------------------------------


def test_status_lists_every_replica_and_fails_when_one_is_gone(cluster2: DevCluster, db: Database) -> None:
    p = ports(cluster2)
    args = ["status", "--json", "--dsn", db.dsn, "--replica-dsn", db.replica_dsn]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["host"] for r in report["replicas"]] == [f"127.0.0.1:{p['replica1']}", f"127.0.0.1:{p['replica2']}"]
    assert all(r["reachable"] and r["in_recovery"] and r["replay_lag_bytes"] is not None for r in report["replicas"])
    assert [r["application_name"] for r in report["replication"]] == ["replica1", "replica2"]

    cluster2.stop_node("replica2")
    try:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 3, result.output
        report = json.loads(result.stdout)
        assert not report["healthy"]
        assert report["problems"] == [f"replica 127.0.0.1:{p['replica2']}: unreachable ({report['replicas'][1]['error']})"]
    finally:
        cluster2.start_node("replica2")
        cluster2.wait_replicas_streaming(timeout=60)


# -- the example in docs/production.md runs ---------------------------------------------------------


def test_the_production_docs_router_example_runs(db: Database, daemons: Callable[..., Daemon]) -> None:
    text = (REPO / "docs" / "production.md").read_text()
    match = re.search(r"<!-- production-test: router -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/production.md lost its Router example"
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        daemons(db).wait_registered(conn)
    env = {**os.environ, "CQRS_PG_DSN": db.dsn, "CQRS_PG_REPLICA_DSN": db.replica_dsn}
    done = subprocess.run([sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["placed", "1200"]
