"""A throwaway PostgreSQL primary with streaming replicas, for development and tests.

The cluster is built from this machine's PostgreSQL server binaries (``initdb``,
``pg_ctl``, ``pg_basebackup``) in a directory of its own::

    ROOT/cluster.json          nodes, ports, bindir, host
    ROOT/primary/data          the primary's data directory
    ROOT/primary/postgres.log  its server log (pg_ctl -l); its Unix socket lives in ROOT/primary
    ROOT/replica1/...          the same for every replica

``initdb`` and ``pg_ctl`` refuse to run as root, so when this process is root every
PostgreSQL binary runs as the ``postgres`` OS user (``runuser -u postgres --``) and ROOT is
owned by that user. Python itself keeps running as root and connects over TCP.

Used by ``cqrs-pg dev up/down/status``, ``cqrs-pg demo`` and the test suite.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import ipaddress
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from cqrs_pg.errors import CqrsPgError

logger = logging.getLogger("cqrs_pg_tools.devcluster")

__all__ = ["ROOT_ENV", "DevCluster", "DevClusterError", "NodeInfo", "find_bindir"]

# The root of `cqrs-pg dev up/down/status` when --root is not given. export_lines() sets
# it, so that after `eval "$(cqrs-pg dev up --root DIR)"` the later `dev status` and
# `dev down` of that shell find the cluster without --root.
ROOT_ENV = "CQRS_PG_DEV_ROOT"
STATE_FILE = "cluster.json"
_STATE_VERSION = 1
_SETTINGS_FILE = "cqrs_pg.conf"  # shared settings: pg_basebackup copies it to every replica
_NODE_FILE = "cqrs_pg_node.conf"  # per node: port, socket dir; rewritten on each replica
_LOG_FILE = "postgres.log"
_SERVICE_USER = "postgres"
_STOP_MODES = ("smart", "fast", "immediate")
_FAST_STOP_TIMEOUT = 30.0
# sun_path holds 108 bytes with the trailing NUL; PostgreSQL also needs "<socket>.lock"
_MAX_SOCKET_PATH = 107 - len(".lock")

_SHARED_SETTINGS = """\
# Written by cqrs_pg_tools.devcluster, shared by every node of the dev cluster.
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
# Replica settings recommended in docs/production.md (Server settings), and why.
# Keeps vacuum on the primary from cancelling replica reads (costs some bloat).
hot_standby_feedback = on
# Feedback every second, not every ten (the default): the primary keeps the versions of the
# rows the engine rewrites every round for as long as the feedback is old, and every read
# of such a row walks them.
wal_receiver_status_interval = 1s
# Replayed locks (a rebuild's table swap, DDL) wait this long for replica reads to end.
max_standby_streaming_delay = 30s
wal_keep_size = 256MB
# Replicas reconnect within a second after the primary restarts (default 5s).
wal_retrieve_retry_interval = 1s
# Kept on (the default) so benchmarks against the dev cluster measure durable commits.
fsync = on
# Commit timestamps: cqrs-pg bench times the daemon's part of a command's latency, from the
# command's commit to its read model's, with the primary's own clock.
track_commit_timestamp = on
shared_buffers = 128MB
max_connections = 200
max_prepared_transactions = 10
# An idle open transaction holds every projection back: do not let one linger.
idle_in_transaction_session_timeout = '10min'
# pg_ctl -l writes the server log to a file next to the data directory.
logging_collector = off
"""


class DevClusterError(CqrsPgError):
    """A dev cluster operation failed.

    ``str(error)`` is one line saying what failed and what to do; ``details`` holds the
    last lines of the server log or of the failing command's output.
    """

    def __init__(self, message: str, details: str = "") -> None:
        # One line: the CLI prints it as is.
        super().__init__(" ".join(message.split()))
        self.details = details


@dataclass
class NodeInfo:
    name: str  # "primary", "replica1", "replica2", ...
    role: str  # "primary" | "replica"
    port: int
    datadir: Path
    running: bool  # filled by status()


# -- locating the server binaries --------------------------------------------------------


def find_bindir() -> Path:
    """The folder holding this machine's PostgreSQL server binaries.

    Looks at ``CQRS_PG_BINDIR``, then ``pg_config --bindir``, then the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's layout); raises DevClusterError when none
    holds ``initdb``.
    """
    env = os.environ.get("CQRS_PG_BINDIR")
    if env:
        # An explicit choice is never second-guessed by the fallbacks.
        path = Path(env).expanduser()
        if (path / "initdb").is_file():
            return path
        raise DevClusterError(
            f"PostgreSQL server binaries not found: no initdb in CQRS_PG_BINDIR={env}; "
            "set CQRS_PG_BINDIR to the folder holding initdb (e.g. /usr/lib/postgresql/15/bin) "
            "or unset it, or install postgresql-15"
        )
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(_debian_bindirs())
    for path in candidates:
        if (path / "initdb").is_file():
            return path
    raise DevClusterError(
        "PostgreSQL server binaries not found: install postgresql-15 "
        "or set CQRS_PG_BINDIR / put pg_config on PATH"
    )


def _debian_bindirs() -> list[Path]:
    """/usr/lib/postgresql/<version>/bin, newest version first."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)

    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)


# -- the cluster ---------------------------------------------------------------------------


class DevCluster:
    """A local primary + N streaming replicas living under ``root``."""

    def __init__(self, root: Path | str = ".cqrs-pg", host: str = "127.0.0.1") -> None:
        # Absolute: the path ends up in server settings and in cluster.json.
        self.root = Path(root).expanduser().absolute()
        self.host = host
        self._as_root = os.geteuid() == 0

    def __repr__(self) -> str:
        return f"DevCluster(root={str(self.root)!r}, host={self.host!r})"

    # -- public API ----------------------------------------------------------------------

    def up(self, replicas: int = 1, base_port: int | None = None, wait: float = 60.0) -> list[NodeInfo]:
        """Start the cluster, building it first if ``root`` holds none; returns status()."""
        if replicas < 0:
            raise DevClusterError(f"replicas must be 0 or more, not {replicas}")
        state = self._read_state()
        if state is not None and state.get("complete"):
            self._reuse(state, replicas, base_port, wait)
        else:
            if state is not None:
                # An earlier up() failed half-way: nothing in it is worth keeping.
                logger.warning("removing the incomplete dev cluster left in %s by a failed up()", self.root)
                self.down(remove=True)
            self._create(replicas, base_port, wait)
        return self.status()

    def holds_cluster(self) -> bool:
        """Whether ``root`` holds a dev cluster: its cluster.json, or the data directory of
        a node whose cluster.json is gone."""
        return self.root.is_dir() and ((self.root / STATE_FILE).exists() or bool(self._orphan_nodes()))

    def down(self, remove: bool = True) -> None:
        """Stop every node (replicas first), then delete ``root`` if ``remove``. A root
        that holds no dev cluster (see holds_cluster) is left as it is."""
        if not self.holds_cluster():
            return
        state = self._read_state()
        nodes = state["nodes"] if state else self._orphan_nodes()
        bindir = Path(state["bindir"]) if state else _safe_bindir()
        # Replicas first: a primary stopping with replicas attached waits for them.
        for node in sorted(nodes, key=lambda n: n["role"] == "primary"):
            if self._is_running(node, bindir):
                self._stop(node, "fast", bindir)
        if remove:
            self._remove_root()

    def status(self) -> list[NodeInfo]:
        """The nodes recorded in cluster.json, with ``running`` from ``pg_ctl status``."""
        state = self._read_state()
        if state is None:
            return []
        bindir = Path(state["bindir"])
        return [
            NodeInfo(
                name=n["name"],
                role=n["role"],
                port=int(n["port"]),
                datadir=Path(n["datadir"]),
                running=self._is_running(n, bindir),
            )
            for n in state["nodes"]
        ]

    def primary_dsn(self, dbname: str = "postgres") -> str:
        """libpq conninfo of the primary."""
        state = self._require_state()
        node = _primary(state)
        return _conninfo(host=state["host"], port=str(node["port"]), dbname=dbname, user=_SERVICE_USER)

    def replica_dsn(self, dbname: str = "postgres") -> str:
        """libpq conninfo of the replica; with several, one multi-host conninfo over all."""
        state = self._require_state()
        replicas = _replicas(state)
        if not replicas:
            raise DevClusterError(
                f"the dev cluster in {self.root} has no replica: "
                "use the primary's DSN, or run down and up again with replicas >= 1"
            )
        host = state["host"]
        if len(replicas) == 1:
            return _conninfo(host=host, port=str(replicas[0]["port"]), dbname=dbname, user=_SERVICE_USER)
        params = {
            "host": ",".join(host for _ in replicas),
            "port": ",".join(str(r["port"]) for r in replicas),
            "dbname": dbname,
            "user": _SERVICE_USER,
            "target_session_attrs": "standby",
        }
        # load_balance_hosts needs libpq 16+; an older libpq rejects the whole conninfo,
        # and psql uses the system's libpq, not psycopg's. (cqrs_pg.routing.Router spreads
        # reads over the hosts itself either way.)
        if min(psycopg.pq.version(), _system_libpq_version()) >= 160000:
            params["load_balance_hosts"] = "random"
        return _conninfo(**params)

    def stop_node(self, name: str, mode: str = "fast") -> None:
        """Stop one node with ``pg_ctl stop -m mode``; no-op if it is not running."""
        if mode not in _STOP_MODES:
            raise DevClusterError(f"unknown stop mode {mode!r}: use one of {', '.join(_STOP_MODES)}")
        state = self._require_state()
        node = self._node(state, name)
        if self._is_running(node, Path(state["bindir"])):
            self._stop(node, mode, Path(state["bindir"]))

    def start_node(self, name: str, wait: float = 60.0) -> None:
        """Start one node and wait until it accepts connections; no-op if it runs."""
        state = self._require_state()
        node = self._node(state, name)
        if not self._is_running(node, Path(state["bindir"])):
            self._start(node, Path(state["bindir"]), wait)

    def restart_node(self, name: str, mode: str = "fast") -> None:
        """``pg_ctl restart -m mode``: stops the node (if running) and starts it again."""
        if mode not in _STOP_MODES:
            raise DevClusterError(f"unknown stop mode {mode!r}: use one of {', '.join(_STOP_MODES)}")
        state = self._require_state()
        node = self._node(state, name)
        bindir = Path(state["bindir"])
        logger.info("restarting %s (port %s, mode %s)", node["name"], node["port"], mode)
        self._pg(
            bindir,
            ["pg_ctl", "-D", node["datadir"], "-l", node["logfile"], "-m", mode, "-w", "-t", "60", "restart"],
            what=f"restarting {node['name']} (pg_ctl restart)",
            log=Path(node["logfile"]),
            timeout=120,
        )

    def wait_replicas_streaming(self, timeout: float = 60.0) -> None:
        """Wait until every replica is in recovery and streams from the primary."""
        state = self._require_state()
        deadline = time.monotonic() + timeout
        while True:
            problem = self._replication_problem(state)
            if problem is None:
                return
            if time.monotonic() >= deadline:
                details = "\n".join(
                    f"--- {n['name']}: {n['logfile']}\n{_tail(Path(n['logfile']))}" for n in state["nodes"]
                )
                raise DevClusterError(
                    f"replicas not streaming after {timeout:g}s ({problem}): see the server logs in {self.root}",
                    details,
                )
            time.sleep(0.1)

    def export_lines(self, dbname: str = "postgres") -> str:
        """Shell lines exporting CQRS_PG_DSN, (if there is a replica) CQRS_PG_REPLICA_DSN,
        and CQRS_PG_DEV_ROOT (this root, for the later `cqrs-pg dev` commands)."""
        lines = [f"export CQRS_PG_DSN={shlex.quote(self.primary_dsn(dbname))}"]
        if _replicas(self._require_state()):
            lines.append(f"export CQRS_PG_REPLICA_DSN={shlex.quote(self.replica_dsn(dbname))}")
        lines.append(f"export {ROOT_ENV}={shlex.quote(str(self.root))}")
        return "\n".join(lines)

    # -- building ----------------------------------------------------------------------------

    def _create(self, replicas: int, base_port: int | None, wait: float) -> None:
        bindir = find_bindir()
        for tool in ("pg_ctl", "pg_basebackup", "postgres"):
            if not (bindir / tool).is_file():
                raise DevClusterError(
                    f"{tool} not found in {bindir}: install the full PostgreSQL server package "
                    "(e.g. postgresql-15) or point CQRS_PG_BINDIR at a complete bin folder"
                )
        self._check_service_user()
        ports = self._choose_ports(replicas + 1, base_port)
        names = ["primary"] + [f"replica{i}" for i in range(1, replicas + 1)]
        nodes = [self._node_record(name, port) for name, port in zip(names, ports, strict=True)]
        for node in nodes:
            sock = Path(node["sockdir"]) / f".s.PGSQL.{node['port']}"
            if len(str(sock)) > _MAX_SOCKET_PATH:
                raise DevClusterError(
                    f"{self.root} is too long a path for a Unix socket ({sock}): "
                    "use a shorter root, e.g. --root /tmp/cqrs-pg"
                )
        self._prepare_root()
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "complete": False,  # set once every node streams; a false here means "rebuild"
            "host": self.host,
            "bindir": str(bindir),
            "nodes": nodes,
        }
        # Written before anything starts so that down() can always find what was started.
        self._write_state(state)
        try:
            primary = nodes[0]
            self._init_primary(primary, bindir)
            self._start(primary, bindir, wait)
            for node in nodes[1:]:
                self._clone_replica(node, primary, bindir, wait)
                self._start(node, bindir, wait)
            self.wait_replicas_streaming(wait)
        except BaseException:
            # Leave no server behind (even one whose pg_ctl start timed out); the files
            # stay for a look at the logs, and the next up() rebuilds from scratch.
            for node in reversed(nodes):
                with contextlib.suppress(DevClusterError):
                    if self._is_running(node, bindir):
                        self._stop(node, "immediate", bindir)
            raise
        state["complete"] = True
        self._write_state(state)
        logger.info("dev cluster up in %s: %s", self.root, ", ".join(f"{n['name']}:{n['port']}" for n in nodes))

    def _reuse(self, state: dict[str, Any], replicas: int, base_port: int | None, wait: float) -> None:
        have = len(_replicas(state))
        if have != replicas:
            raise DevClusterError(
                f"the dev cluster in {self.root} has {have} replica(s), not {replicas}: "
                f"run down first to rebuild it, or ask for {have}"
            )
        if base_port is not None and int(_primary(state)["port"]) != base_port:
            logger.warning(
                "dev cluster in %s keeps its ports (primary %s); base_port %s ignored",
                self.root,
                _primary(state)["port"],
                base_port,
            )
        bindir = Path(state["bindir"])
        for node in state["nodes"]:
            if not (Path(node["datadir"]) / "PG_VERSION").is_file():
                raise DevClusterError(
                    f"the dev cluster in {self.root} is damaged ({node['datadir']} is missing): "
                    "run down to remove it, then up again"
                )
        # Primary first: a replica started alone only retries its connection.
        for node in sorted(state["nodes"], key=lambda n: n["role"] != "primary"):
            if not self._is_running(node, bindir):
                self._start(node, bindir, wait)
        self.wait_replicas_streaming(wait)
        logger.info("dev cluster in %s already built; reused", self.root)

    def _node_record(self, name: str, port: int) -> dict[str, Any]:
        nodedir = self.root / name
        return {
            "name": name,
            "role": "primary" if name == "primary" else "replica",
            "port": port,
            "datadir": str(nodedir / "data"),
            "sockdir": str(nodedir),
            "logfile": str(nodedir / _LOG_FILE),
        }

    def _init_primary(self, node: dict[str, Any], bindir: Path) -> None:
        self._make_node_dir(node)
        logger.info("initdb %s", node["datadir"])
        self._pg(
            bindir,
            [
                "initdb", "-D", node["datadir"], "-A", "trust", "-U", _SERVICE_USER,
                "--no-sync", "-E", "UTF8", "--locale=C",
            ],
            what="initdb of the primary",
            timeout=300,
        )
        datadir = Path(node["datadir"])
        self._write_file(datadir / _SETTINGS_FILE, _SHARED_SETTINGS)
        self._write_node_settings(node)
        with open(datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            # Included last, so they win over initdb's defaults above.
            f.write(f"\n# cqrs_pg dev cluster\ninclude '{_SETTINGS_FILE}'\ninclude '{_NODE_FILE}'\n")
        self._write_file(datadir / "pg_hba.conf", self._hba())

    def _clone_replica(self, node: dict[str, Any], primary: dict[str, Any], bindir: Path, wait: float) -> None:
        self._make_node_dir(node)
        logger.info("pg_basebackup %s from port %s", node["name"], primary["port"])
        # application_name ends up in primary_conninfo (-R): pg_stat_replication names the replica.
        source = _conninfo(
            host=self.host, port=str(primary["port"]), user=_SERVICE_USER, application_name=node["name"]
        )
        self._pg(
            bindir,
            [
                "pg_basebackup", "-d", source, "-D", node["datadir"],
                "-X", "stream", "-R", "-c", "fast",
                "-C", "-S", node["name"],  # a slot per replica: the primary keeps WAL it has not received
            ],
            what=f"pg_basebackup of {node['name']}",
            log=Path(primary["logfile"]),
            timeout=max(wait, 60) * 5,
        )
        self._write_node_settings(node)

    def _write_node_settings(self, node: dict[str, Any]) -> None:
        text = (
            f"# Written by cqrs_pg_tools.devcluster for node {node['name']}.\n"
            f"listen_addresses = {_conf_str(self.host)}\n"
            f"port = {int(node['port'])}\n"
            # Its own socket dir: /var/run/postgresql belongs to the system service.
            f"unix_socket_directories = {_conf_str(node['sockdir'])}\n"
            # Shows in `ps`: tells these servers apart from the system one.
            f"cluster_name = {_conf_str('cqrs-pg-' + node['name'])}\n"
        )
        self._write_file(Path(node["datadir"]) / _NODE_FILE, text)

    def _hba(self) -> str:
        lines = [
            "# Written by cqrs_pg_tools.devcluster: a local throwaway cluster, so trust.",
            "local all         all trust",
            "local replication all trust",
        ]
        nets = ["127.0.0.1/32", "::1/128"]
        with contextlib.suppress(ValueError):
            addr = ipaddress.ip_address(self.host)
            if not addr.is_loopback and not addr.is_unspecified:
                nets.append(f"{addr}/{addr.max_prefixlen}")
        for net in nets:
            lines.append(f"host  all         all {net} trust")
            lines.append(f"host  replication all {net} trust")
        return "\n".join(lines) + "\n"

    # -- files and directories -----------------------------------------------------------

    def _prepare_root(self) -> None:
        if self._as_root:
            self._check_traversable()  # before creating anything
        if self.root.exists():
            if not self.root.is_dir():
                raise DevClusterError(f"{self.root} is not a directory: choose another root, e.g. --root /tmp/cqrs-pg")
            if any(self.root.iterdir()):
                # Its contents would be deleted by down(): only ever take an empty directory.
                raise DevClusterError(
                    f"{self.root} is not empty and holds no dev cluster ({STATE_FILE} missing): "
                    "choose an empty or new directory as root"
                )
        else:
            missing = [p for p in [self.root, *self.root.parents] if not p.exists()]
            for path in reversed(missing):
                path.mkdir()
                path.chmod(0o755)  # whatever the umask: the postgres user must pass through
        self._chown(self.root)
        self.root.chmod(0o755)

    def _check_traversable(self) -> None:
        pw = pwd.getpwnam(_SERVICE_USER)
        gids = set(os.getgrouplist(_SERVICE_USER, pw.pw_gid))
        for parent in reversed(self.root.parents):
            if not parent.exists():
                break  # the rest is created by us, mode 755
            st = parent.stat()
            if st.st_uid == pw.pw_uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in gids:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise DevClusterError(
                    f"the {_SERVICE_USER} user cannot enter {parent} (mode {stat.filemode(st.st_mode)}), "
                    f"so it cannot run a server under {self.root}: use a root it can reach, e.g. --root /tmp/cqrs-pg"
                )

    def _make_node_dir(self, node: dict[str, Any]) -> None:
        nodedir = Path(node["sockdir"])
        nodedir.mkdir(mode=0o755, exist_ok=True)
        self._chown(nodedir)

    def _write_file(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if self._as_root:
            pw = pwd.getpwnam(_SERVICE_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _remove_root(self) -> None:
        ours = {STATE_FILE, STATE_FILE + ".tmp", "primary"} | {p.name for p in self.root.glob("replica*")}
        for entry in self.root.iterdir():
            if entry.name in ours:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        try:
            self.root.rmdir()
        except OSError:
            # Someone put files of their own here: keep them, and the directory.
            logger.warning("left %s in place: it holds files the dev cluster did not create", self.root)
        else:
            logger.info("removed dev cluster in %s", self.root)

    def _orphan_nodes(self) -> list[dict[str, Any]]:
        """Nodes of a root whose cluster.json is gone, so down() still stops them."""
        nodes = []
        for datadir in sorted(self.root.glob("*/data")):
            if (datadir / "PG_VERSION").is_file():
                name = datadir.parent.name
                nodes.append(self._node_record(name, 0))
        return nodes

    # -- state file --------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        path = self.root / STATE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            state: dict[str, Any] = json.loads(text)
            if state.get("version") != _STATE_VERSION or not isinstance(state.get("nodes"), list):
                raise ValueError(f"unknown layout (version {state.get('version')!r})")
        except ValueError as e:
            raise DevClusterError(f"cannot read {path}: {e}; stop its servers by hand or delete the directory") from e
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        path = self.root / STATE_FILE
        tmp = path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a file

    def _require_state(self) -> dict[str, Any]:
        state = self._read_state()
        if state is None:
            raise DevClusterError(f"no dev cluster in {self.root}: run `cqrs-pg dev up` (DevCluster.up()) first")
        return state

    def _node(self, state: dict[str, Any], name: str) -> dict[str, Any]:
        for node in state["nodes"]:
            if node["name"] == name:
                return dict(node)
        names = ", ".join(n["name"] for n in state["nodes"])
        raise DevClusterError(f"no node named {name!r} in the dev cluster in {self.root}: use one of {names}")

    # -- ports ---------------------------------------------------------------------------------

    def _choose_ports(self, count: int, base_port: int | None) -> list[int]:
        if base_port is not None:
            ports = list(range(base_port, base_port + count))
            for port in ports:
                if not 1024 <= port <= 65535:
                    raise DevClusterError(
                        f"port {port} is out of range: choose a base port between 1024 and {65535 - count + 1}"
                    )
                if not _port_free(self.host, port):
                    raise DevClusterError(
                        f"port {port} on {self.host} is in use: choose another base port or leave it unset"
                    )
            return ports
        # Keep every probe socket open until all are chosen, so the ports are distinct.
        family = _family(self.host)
        with contextlib.ExitStack() as stack:
            ports = []
            for _ in range(count):
                s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
                s.bind((self.host, 0))
                ports.append(int(s.getsockname()[1]))
        for port in ports:
            if not _port_free(self.host, port):
                raise DevClusterError(f"port {port} on {self.host} was taken meanwhile: run up again")
        return ports

    # -- running PostgreSQL binaries ---------------------------------------------------------

    def _check_service_user(self) -> None:
        if not self._as_root:
            return
        try:
            pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            raise DevClusterError(
                f"running as root needs an OS user {_SERVICE_USER!r} to run the servers "
                "(initdb and pg_ctl refuse root): install the postgresql package or run as a non-root user"
            ) from None
        if shutil.which("runuser") is None:
            raise DevClusterError(
                "running as root needs `runuser` to start PostgreSQL as postgres: install util-linux"
            )

    def _pg(
        self,
        bindir: Path,
        args: Sequence[str],
        *,
        what: str,
        timeout: float,
        log: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary (as postgres when we are root); failures -> DevClusterError."""
        cmd = [str(bindir / args[0]), *args[1:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST/PGPORT...
        if self._as_root:
            cmd = [shutil.which("runuser") or "runuser", "-u", _SERVICE_USER, "--", *cmd]
            env["HOME"] = pwd.getpwnam(_SERVICE_USER).pw_dir
        # A cwd the postgres user can enter (initdb and pg_ctl look at theirs).
        cwd = self.root if self.root.is_dir() else Path("/")
        log_start = _size(log)
        logger.debug("running %s", shlex.join(cmd))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as e:
            out = _text(e.stdout) + _text(e.stderr)
            raise DevClusterError(
                f"{what} did not finish within {timeout:g}s: see .details and {log or self.root}",
                _details(out, log),
            ) from None
        except OSError as e:
            raise DevClusterError(
                f"{what} could not be run ({e}): check the PostgreSQL installation in {bindir}"
            ) from None
        if check and proc.returncode != 0:
            raise DevClusterError(
                f"{what} failed (exit {proc.returncode}): {_reason(proc.stderr or proc.stdout, log, log_start)}",
                _details(proc.stdout + proc.stderr, log),
            )
        return proc

    def _start(self, node: dict[str, Any], bindir: Path, wait: float) -> None:
        logger.info("starting %s on port %s", node["name"], node["port"])
        self._pg(
            bindir,
            ["pg_ctl", "-D", node["datadir"], "-l", node["logfile"], "-w", "-t", str(max(1, int(wait))), "start"],
            what=f"starting {node['name']} on port {node['port']}",
            log=Path(node["logfile"]),
            timeout=wait + 30,
        )

    def _stop(self, node: dict[str, Any], mode: str, bindir: Path) -> None:
        logger.info("stopping %s (mode %s)", node["name"], mode)
        log = Path(node["logfile"])
        base = ["pg_ctl", "-D", node["datadir"], "-w"]
        try:
            self._pg(
                bindir,
                [*base, "-t", str(int(_FAST_STOP_TIMEOUT)), "-m", mode, "stop"],
                what=f"stopping {node['name']}",
                log=log,
                timeout=_FAST_STOP_TIMEOUT + 15,
            )
        except DevClusterError:
            if mode == "immediate":
                raise
            # A client that never lets go must not block down(): immediate needs crash recovery, nothing more.
            logger.warning("%s did not stop in %s mode; stopping it in immediate mode", node["name"], mode)
            self._pg(
                bindir,
                [*base, "-t", "30", "-m", "immediate", "stop"],
                what=f"stopping {node['name']} (immediate)",
                log=log,
                timeout=45,
            )

    def _is_running(self, node: dict[str, Any], bindir: Path) -> bool:
        datadir = Path(node["datadir"])
        if not (datadir / "postmaster.pid").exists():
            return False  # cheap answer for the common "stopped" case
        proc = self._pg(
            bindir, ["pg_ctl", "-D", str(datadir), "status"], what="pg_ctl status", timeout=30, check=False
        )
        return proc.returncode == 0  # 3: not running, 4: no data directory

    # -- replication checks --------------------------------------------------------------

    def _replication_problem(self, state: dict[str, Any]) -> str | None:
        """None when every replica streams; else what is still missing."""
        replicas = _replicas(state)
        if not replicas:
            return None
        host = state["host"]
        for node in replicas:
            dsn = _conninfo(host=host, port=str(node["port"]), dbname="postgres", user=_SERVICE_USER)
            try:
                with _connect(dsn) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            except psycopg.Error as e:
                return f"cannot connect to {node['name']} on port {node['port']}: {_last_line(str(e))}"
            if not row or not row[0]:
                return f"{node['name']} is not in recovery"
        try:
            primary = _conninfo(host=host, port=str(_primary(state)["port"]), dbname="postgres", user=_SERVICE_USER)
            with _connect(primary) as conn:
                rows = conn.execute("SELECT application_name, state FROM pg_stat_replication").fetchall()
        except psycopg.Error as e:
            return f"cannot connect to the primary: {_last_line(str(e))}"
        streaming = {name for name, st in rows if st == "streaming"}
        missing = [n["name"] for n in replicas if n["name"] not in streaming]
        if missing:
            seen = ", ".join(f"{name}={st}" for name, st in rows) or "no walsender"
            return f"not streaming yet: {', '.join(missing)} (primary sees {seen})"
        return None


# -- helpers -------------------------------------------------------------------------------


def _primary(state: dict[str, Any]) -> dict[str, Any]:
    for node in state["nodes"]:
        if node["role"] == "primary":
            return dict(node)
    raise DevClusterError("cluster.json lists no primary: run down and up again")


def _replicas(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(n) for n in state["nodes"] if n["role"] == "replica"]


@contextlib.contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        yield conn


@functools.cache
def _system_libpq_version() -> int:
    """PQlibVersion() of the libpq that psql and other clients here load; 0 if none is found."""
    name = ctypes.util.find_library("pq")
    if name is None:
        return 0
    try:
        return int(ctypes.CDLL(name).PQlibVersion())
    except (OSError, AttributeError):
        return 0


def _conninfo(**params: str) -> str:
    """A libpq key=value conninfo, values quoted where libpq needs it."""
    parts = []
    for key, value in params.items():
        quoted = value
        if value == "" or re.search(r"[\s'\\]", value):
            quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={quoted}")
    return " ".join(parts)


def _conf_str(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("'", "''") + "'"


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR like the postmaster: a port in TIME_WAIT is usable, one with a listener is not.
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _safe_bindir() -> Path:
    try:
        return find_bindir()
    except DevClusterError:
        return Path("/usr/lib/postgresql/15/bin")


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _reason(output: str, log: Path | None, log_start: int) -> str:
    """The server's own FATAL/PANIC line written during the command, else the command's last line."""
    if log is not None:
        try:
            with open(log, "rb") as f:
                f.seek(log_start)
                new = f.read().decode(errors="replace")
        except OSError:
            new = ""
        for line in reversed(new.splitlines()):
            m = re.search(r"\b(?:FATAL|PANIC):\s+(.*)", line)
            if m:
                return m.group(1).strip()
    return _last_line(output)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _details(output: str, log: Path | None) -> str:
    out = "\n".join(output.strip().splitlines()[-20:])
    parts = [f"--- output\n{out}" if out else "--- output: none"]
    if log is not None:
        parts.append(f"--- last lines of {log}\n{_tail(log)}")
    return "\n".join(parts)
