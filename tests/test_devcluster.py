"""cqrs_pg_tools.devcluster against real PostgreSQL servers built from this machine's binaries.

Most tests share one module-scoped cluster (primary + 1 replica); one test builds its own
two-replica cluster. Nothing is mocked.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cqrs_pg_tools.devcluster import DevCluster, DevClusterError, find_bindir

pytestmark = pytest.mark.slow  # clusters of its own


def _postgres_can_enter(path: Path) -> bool:
    """Whether the postgres OS user (which runs the servers when we are root) can reach path."""
    if os.geteuid() != 0:
        return True
    runuser = shutil.which("runuser") or "runuser"
    return subprocess.run([runuser, "-u", "postgres", "--", "test", "-x", str(path)], check=False).returncode == 0


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for cluster roots that the postgres OS user can traverse."""
    path = tmp_path_factory.mktemp("devcluster")
    if _postgres_can_enter(path):
        yield path
        return
    # pytest's tmp dirs may sit under a mode-700 /tmp/pytest-of-root.
    own = Path(tempfile.mkdtemp(prefix="cqrs-pg-test-", dir="/tmp"))
    own.chmod(0o755)
    try:
        yield own
    finally:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(base_dir: Path) -> Iterator[DevCluster]:
    dc = DevCluster(base_dir / "c1")
    try:
        dc.up(replicas=1)
        yield dc
    finally:
        dc.down()


def _one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met within timeout"
        time.sleep(0.05)


def _replicated(dc: DevCluster) -> str:
    """Writes a fresh marker row on the primary and waits until the replica shows it."""
    marker = str(uuid.uuid4())
    primary = dc.primary_dsn()
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS devcluster_probe (marker text PRIMARY KEY)")
        conn.execute("INSERT INTO devcluster_probe VALUES (%s)", (marker,))

    def seen() -> bool:
        try:
            return bool(_one(dc.replica_dsn(), "SELECT count(*) FROM devcluster_probe WHERE marker = %s", (marker,)))
        except psycopg.errors.UndefinedTable:
            return False

    _eventually(seen)
    return marker


def test_table_created_on_primary_appears_on_replica(cluster: DevCluster) -> None:
    primary, replica = cluster.primary_dsn(), cluster.replica_dsn()
    assert primary.startswith("host=127.0.0.1 port=") and primary.endswith(" dbname=postgres user=postgres")
    assert "," not in replica and replica != primary

    _replicated(cluster)

    assert _one(replica, "SELECT pg_is_in_recovery()") is True
    assert _one(primary, "SELECT pg_is_in_recovery()") is False
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        _one(replica, "CREATE TABLE must_fail (x int)")
    # The replica is attached through its own physical slot.
    assert _one(primary, "SELECT array_agg(slot_name) FROM pg_replication_slots WHERE active") == ["replica1"]


def test_status_reports_running_nodes(cluster: DevCluster) -> None:
    nodes = cluster.status()
    assert [(n.name, n.role, n.running) for n in nodes] == [("primary", "primary", True), ("replica1", "replica", True)]
    assert len({n.port for n in nodes}) == 2
    for node in nodes:
        assert (node.datadir / "PG_VERSION").is_file()
        assert node.datadir.is_relative_to(cluster.root)
        assert _one(f"host=127.0.0.1 port={node.port} user=postgres dbname=postgres", "SHOW port") == str(node.port)
    # Settings the rest of cqrs_pg relies on.
    primary = cluster.primary_dsn()
    assert _one(primary, "SHOW wal_level") == "replica"
    assert _one(primary, "SHOW hot_standby_feedback") == "on"
    assert _one(primary, "SHOW max_prepared_transactions") == "10"
    assert _one(primary, "SHOW unix_socket_directories") == str(cluster.root / "primary")


def test_export_lines_are_shell_quoted(cluster: DevCluster) -> None:
    words = [shlex.split(line) for line in cluster.export_lines("app db").splitlines()]
    assert words == [
        ["export", f"CQRS_PG_DSN={cluster.primary_dsn('app db')}"],
        ["export", f"CQRS_PG_REPLICA_DSN={cluster.replica_dsn('app db')}"],
        ["export", f"CQRS_PG_DEV_ROOT={cluster.root}"],
    ]
    assert "dbname='app db'" in cluster.primary_dsn("app db")


def test_up_again_reuses_the_cluster_and_starts_stopped_nodes(cluster: DevCluster) -> None:
    before = {n.name: n.port for n in cluster.status()}
    cluster.stop_node("replica1")
    nodes = cluster.up(replicas=1)
    assert {n.name: n.port for n in nodes} == before
    assert all(n.running for n in nodes)
    with pytest.raises(DevClusterError, match="down"):
        cluster.up(replicas=2)


def test_stopped_replica_streams_again_after_start(cluster: DevCluster) -> None:
    cluster.stop_node("replica1")
    assert {n.name: n.running for n in cluster.status()} == {"primary": True, "replica1": False}
    with pytest.raises(psycopg.OperationalError):
        _one(cluster.replica_dsn(), "SELECT 1")
    cluster.stop_node("replica1")  # stopping a stopped node is a no-op

    # Written while the replica is down: its slot keeps the WAL for it.
    marker = str(uuid.uuid4())
    with psycopg.connect(cluster.primary_dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS devcluster_probe (marker text PRIMARY KEY)")
        conn.execute("INSERT INTO devcluster_probe VALUES (%s)", (marker,))

    cluster.start_node("replica1")
    cluster.wait_replicas_streaming(timeout=30)
    _eventually(
        lambda: bool(_one(cluster.replica_dsn(), "SELECT count(*) FROM devcluster_probe WHERE marker = %s", (marker,)))
    )


def test_replica_reconnects_after_primary_restart(cluster: DevCluster) -> None:
    started = _one(cluster.primary_dsn(), "SELECT pg_postmaster_start_time()")
    cluster.restart_node("primary")
    assert _one(cluster.primary_dsn(), "SELECT pg_postmaster_start_time()") > started
    cluster.wait_replicas_streaming(timeout=30)
    _replicated(cluster)


def test_failed_start_raises_with_log_in_details(cluster: DevCluster) -> None:
    node_conf = cluster.root / "replica1" / "data" / "cqrs_pg_node.conf"
    good = node_conf.read_text()
    cluster.stop_node("replica1")
    try:
        node_conf.write_text(good + "shared_buffers = 'not a size'\n")
        with pytest.raises(DevClusterError) as info:
            cluster.start_node("replica1", wait=20)
        assert "\n" not in str(info.value)
        assert "replica1" in str(info.value)
        assert "cqrs_pg_node.conf" in str(info.value)  # the server's own FATAL line, not "see the log"
        assert "shared_buffers" in info.value.details
    finally:
        node_conf.write_text(good)
    cluster.start_node("replica1")
    cluster.wait_replicas_streaming(timeout=30)


def test_unknown_node_and_bad_mode(cluster: DevCluster) -> None:
    with pytest.raises(DevClusterError, match="replica1"):
        cluster.stop_node("replica9")
    with pytest.raises(DevClusterError, match="immediate"):
        cluster.stop_node("replica1", mode="abrupt")


def test_taken_base_port_is_refused(cluster: DevCluster, base_dir: Path) -> None:
    taken = cluster.status()[0].port
    other = DevCluster(base_dir / "port-clash")
    with pytest.raises(DevClusterError, match=f"port {taken}"):
        other.up(replicas=0, base_port=taken)
    other.down()
    assert not other.root.exists()


def test_two_replicas_multi_host_dsn_then_down(base_dir: Path) -> None:
    dc = DevCluster(base_dir / "c2")
    try:
        nodes = dc.up(replicas=2)
        assert [n.name for n in nodes] == ["primary", "replica1", "replica2"]
        ports = {n.name: n.port for n in nodes}
        dsn = dc.replica_dsn()
        assert f"port={ports['replica1']},{ports['replica2']}" in dsn
        assert "host=127.0.0.1,127.0.0.1" in dsn and "target_session_attrs=standby" in dsn
        assert "CQRS_PG_REPLICA_DSN" in dc.export_lines()

        # Both replicas stream, with the settings docs/production.md recommends.
        streaming = _one(
            dc.primary_dsn(), "SELECT array_agg(application_name ORDER BY 1) FROM pg_stat_replication WHERE state = 'streaming'"
        )
        assert streaming == ["replica1", "replica2"]
        for name in ("replica1", "replica2"):
            one = f"host=127.0.0.1 port={ports[name]} dbname=postgres user=postgres"
            assert _one(one, "SELECT pg_is_in_recovery()") is True
            assert _one(one, "SHOW hot_standby_feedback") == "on"
            assert _one(one, "SHOW wal_receiver_status_interval") == "1s"
            assert _one(one, "SHOW max_standby_streaming_delay") == "30s"
        assert _one(dc.primary_dsn(), "SHOW idle_in_transaction_session_timeout") == "10min"

        # psql (the system's libpq, perhaps older than psycopg's) accepts the exported DSN.
        psql = subprocess.run(["psql", dsn, "-Atc", "SELECT pg_is_in_recovery()"], capture_output=True, text=True, timeout=30)
        assert psql.returncode == 0 and psql.stdout.strip() == "t", psql.stderr

        seen = set()
        for _ in range(20):
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
                assert row is not None and row[0] is True
                seen.add(row[1])
        if "load_balance_hosts=random" in dsn:  # only when every libpq here has it (16+)
            assert seen == {ports["replica1"], ports["replica2"]}

        # target_session_attrs=standby skips a replica that is down.
        dc.stop_node("replica1")
        assert _one(dsn, "SELECT inet_server_port()") == ports["replica2"]
    finally:
        dc.down()
    assert not dc.root.exists()
    dc.down()  # a second down is a no-op
    assert not dc.holds_cluster()
    assert dc.status() == []
    with pytest.raises(DevClusterError, match="dev up"):
        dc.primary_dsn()


def test_missing_binaries_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("CQRS_PG_BINDIR", str(empty))
    with pytest.raises(DevClusterError) as info:
        find_bindir()
    message = str(info.value)
    assert "not found" in message and str(empty) in message
    assert "CQRS_PG_BINDIR" in message and "install postgresql" in message

    root = tmp_path / "never-built"
    with pytest.raises(DevClusterError, match="CQRS_PG_BINDIR"):
        DevCluster(root).up()
    assert not root.exists()


def test_refuses_a_non_empty_foreign_root(base_dir: Path) -> None:
    root = base_dir / "foreign"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(DevClusterError, match="not empty"):
        DevCluster(root).up(replicas=0)
    assert (root / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the servers to the postgres user")
def test_root_unreachable_by_postgres_user() -> None:
    hidden = Path(tempfile.mkdtemp(prefix="cqrs-pg-hidden-", dir="/tmp"))  # mode 700, owned by root
    try:
        with pytest.raises(DevClusterError, match="--root") as info:
            DevCluster(hidden / "cluster").up(replicas=0)
        assert str(hidden) in str(info.value)
    finally:
        shutil.rmtree(hidden)
