"""The `cqrs-pg` command line."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cqrs_pg import __version__
from cqrs_pg.db import DSN_ENV, REPLICA_DSN_ENV, require_dsn
from cqrs_pg.errors import CqrsPgError

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    """--dsn and --replica-dsn, overriding CQRS_PG_DSN and CQRS_PG_REPLICA_DSN."""
    func = click.option(
        "--replica-dsn",
        envvar=REPLICA_DSN_ENV,
        metavar="DSN",
        help=f"Where reads go; several hosts allowed [env {REPLICA_DSN_ENV}; unset: the primary].",
    )(func)
    func = click.option(
        "--dsn", envvar=DSN_ENV, metavar="DSN", help=f"The primary: a libpq conninfo or URI [env {DSN_ENV}]."
    )(func)
    return func


def root_option(func: F) -> F:
    return click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path(".cqrs-pg"),
        show_default=True,
        help="Directory holding the local cluster's data.",
    )(func)


class Group(click.Group):
    """Turns operational errors into one line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CqrsPgError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cqrs-pg")
def main() -> None:
    """CQRS built from PostgreSQL itself.

    Commands are SQL functions (shop.place_order, ...); triggers append their events to
    cqrs.outbox; `cqrs-pg listen` keeps the read models in shop_read up to date; reads go
    to a streaming replica, with cqrs.caught_up(token) for read-your-writes.
    """


@main.command()
@connection_options
@click.option("--to", "to", default="head", show_default=True, metavar="REV", help="Target revision; 'base' removes everything.")
def migrate(dsn: str | None, replica_dsn: str | None, to: str) -> None:
    """Upgrade (or downgrade) the database to a migration revision.

    The same as `alembic upgrade REV` with CQRS_PG_DSN set. Runs on the primary only.
    """
    from cqrs_pg.migrate import migrate as run_migrate

    before, after = run_migrate(require_dsn(dsn), to)
    if before == after:
        click.echo(f"already at {after or 'base'}")
    else:
        click.echo(f"migrated {before or 'base'} -> {after or 'base'}")


@main.command()
@connection_options
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1), help="Events per batch and transaction.")
@click.option("--poll-interval", default=1.0, show_default=True, type=click.FloatRange(0.01), help="Seconds between polls when no NOTIFY arrives.")
@click.option("--refresh-interval", default=1.0, show_default=True, type=click.FloatRange(0), help="Refresh materialized views at most this often (seconds).")
@click.option("--projection", "projections", multiple=True, metavar="NAME", help="Run only this projection (repeatable; default: all).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]), help="json: one JSON object per line.")
@click.option(
    "--stall-warning",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
    help="Warn, naming the blocking backend, when committed events have waited this long behind an open transaction.",
)
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT", help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: off).")
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="Import this module first: it registers python projection handlers (repeatable).")
def listen(
    dsn: str | None,
    replica_dsn: str | None,
    batch_size: int,
    poll_interval: float,
    refresh_interval: float,
    projections: tuple[str, ...],
    log_level: str,
    log_format: str,
    stall_warning: float,
    metrics_port: int | None,
    imports: tuple[str, ...],
) -> None:
    """Run the projection daemon until SIGTERM or SIGINT.

    Woken by LISTEN/NOTIFY, polling as a fallback. On SIGTERM/SIGINT it finishes the
    batch in hand and exits 0. Safe to kill at any moment: each batch commits together
    with its checkpoint.
    """
    from cqrs_pg.daemon import Listener, ListenerConfig
    from cqrs_pg.logs import setup_logging
    from cqrs_pg.projections import import_modules

    setup_logging(log_level, log_format)
    import_modules(imports)
    listener = Listener(
        ListenerConfig(
            dsn=require_dsn(dsn),
            batch_size=batch_size,
            poll_interval=poll_interval,
            refresh_interval=refresh_interval,
            projections=list(projections) or None,
            stall_warning=stall_warning,
            metrics_port=metrics_port,
        )
    )

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger("cqrs_pg.daemon").info("received %s: finishing", signal.Signals(signum).name)
        listener.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener.run()


@main.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(dsn: str | None, replica_dsn: str | None, as_json: bool) -> None:
    """Show each projection's progress, replica lag and what holds the fence back."""
    from cqrs_pg.status import collect, render

    report = collect(require_dsn(dsn), replica_dsn)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))


@main.group()
def dev() -> None:
    """A local primary and streaming replica(s) from this machine's PostgreSQL binaries."""


@dev.command("up")
@root_option
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(0, 8))
@click.option("--port", type=click.IntRange(1024, 65535), help="First port (default: free ports).")
def dev_up(root: Path, replicas: int, port: int | None) -> None:
    """Start (or reuse) the cluster and print the export lines for it.

    As root, the servers run as the `postgres` OS user. Use with:
    eval "$(cqrs-pg dev up)"
    """
    from cqrs_pg.devcluster import DevCluster

    cluster = DevCluster(root)
    nodes = cluster.up(replicas=replicas, base_port=port)
    for node in nodes:
        click.echo(f"# {node.name}: port {node.port}, data {node.datadir}", err=True)
    click.echo(cluster.export_lines())


@dev.command("down")
@root_option
@click.option("--keep-data", is_flag=True, help="Stop the servers but keep their data.")
def dev_down(root: Path, keep_data: bool) -> None:
    """Stop the cluster and (unless --keep-data) delete it."""
    from cqrs_pg.devcluster import DevCluster

    DevCluster(root).down(remove=not keep_data)
    click.echo(f"stopped{'' if keep_data else ' and removed'} {root}")


@dev.command("status")
@root_option
def dev_status(root: Path) -> None:
    """List the cluster's nodes and whether they run."""
    from cqrs_pg.devcluster import DevCluster

    nodes = DevCluster(root).status()
    if not nodes:
        click.echo(f"no cluster under {root}: run `cqrs-pg dev up`")
        return
    for node in nodes:
        click.echo(f"{node.name:<10} {node.role:<8} port {node.port:<6} {'running' if node.running else 'stopped'}  {node.datadir}")


@main.command()
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 64), help="Concurrent command clients.")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(0.5), help="How long the workload runs.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Cluster directory (default: a temporary one).")
@click.option("--keep", is_flag=True, help="Leave the cluster running and print how to reach it.")
def demo(clients: int, seconds: float, root: Path | None, keep: bool) -> None:
    """The first run: primary + replica, migrate, daemon, a concurrent workload, results.

    Starts a throwaway primary and streaming replica, installs the schema, runs the
    daemon and a mixed shop workload from several clients, then prints read models
    and lag figures read from the replica, and tears everything down.
    """
    from cqrs_pg.demo import run_demo

    run_demo(clients=clients, seconds=seconds, root=root, keep=keep, echo=click.echo)


@main.command()
@click.option("--seconds", default=120.0, show_default=True, type=click.FloatRange(1), help="How long the writers run.")
@click.option("--writers", default=8, show_default=True, type=click.IntRange(1, 64), help="Concurrent command clients.")
@click.option("--kills", type=click.IntRange(0), help="SIGKILLs of the daemon [default: one per 1.5 s, at least 10].")
@click.option("--terminations", type=click.IntRange(0), help="pg_terminate_backend of its connections [default: one per 5 s, at least 3].")
@click.option("--restart-primary/--no-restart-primary", default=True, show_default=True, help="Crash and restart the primary once, mid-run.")
@click.option("--seed", type=int, help="Random seed, to repeat a run's fault timetable.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Cluster directory (default: a temporary one, kept when the run fails).")
def soak(
    seconds: float,
    writers: int,
    kills: int | None,
    terminations: int | None,
    restart_primary: bool,
    seed: int | None,
    root: Path | None,
) -> None:
    """A long chaos run: proof that no event is lost or applied twice.

    On a throwaway primary + replica, writers commit out of order while the daemon is
    killed with SIGKILL, its connections are terminated and the primary crashes once.
    Then every read model must equal its definition and every projection must have
    applied each outbox event exactly once, on the primary and on the replica.
    Exits 1 if not. The test suite runs a 15-second version of this.
    """
    from cqrs_pg.chaos import soak as run_soak

    if not run_soak(
        seconds=seconds, writers=writers, kills=kills, terminations=terminations,
        restart_primary=restart_primary, seed=seed, root=root, echo=click.echo,
    ):
        raise SystemExit(1)


def _client_counts(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(c < 1 or c > 100 for c in counts):
        raise click.BadParameter(f"{value!r}: give client counts from 1 to 100, comma-separated, e.g. 1,4,16")
    return tuple(dict.fromkeys(counts))


@main.command()
@click.option("--seconds", default=10, show_default=True, type=click.IntRange(1), help="Length of each measured pgbench run.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Interleaved rounds: each runs every variant once at each client count.")
@click.option("--clients", default="1,4,16", show_default=True, callback=_client_counts, metavar="N,N,...", help="Client counts (pgbench -c N -j 2).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(1), help="Seconds of load before the measured run with the daemon running.")
@click.option("--quick", is_flag=True, help="1 round of 1-second runs at 1 and 4 clients: checks that it works, measures nothing.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE", help="Also write all runs, medians, ratios and machine info here.")
@click.option("--dsn", metavar="DSN", help="Use this server (creates and drops databases; needs superuser) instead of a throwaway primary + replica.")
def bench(seconds: int, rounds: int, clients: tuple[int, ...], warmup: int, quick: bool, json_path: Path | None, dsn: str | None) -> None:
    """Command throughput: place_order (2 lines) beside baselines, in one run.

    pgbench drives, at each client count and in interleaved rounds, one database per variant:
    (a) the same writes as plain SQL, no triggers; (b) the command with the outbox and no
    wake-up; with the wake-up: (c) daemon stopped, (d) daemon idle when the load starts,
    (e) daemon running under load; (f) the naive NOTIFY in every command. Prints medians with
    their spread and the ratios at the largest client count (targets: c, d, e >= 0.95 x b;
    c >= 0.80 x a), and the daemon's CPU time. Takes about 6 x clients x rounds x seconds.
    """
    from cqrs_pg.bench import BenchConfig, run_bench

    if quick:
        config = BenchConfig.quick(dsn=dsn)
        command = "cqrs-pg bench --quick"
    else:
        config = BenchConfig(seconds=seconds, rounds=rounds, clients=clients, warmup=warmup, dsn=dsn)
        command = f"cqrs-pg bench --seconds {seconds} --rounds {rounds} --clients {','.join(map(str, clients))} --warmup {warmup}"
    if dsn:
        command += " --dsn …"
    run_bench(config, echo=click.echo, json_path=json_path, command=command)


@main.command()
@connection_options
@click.argument("projection")
@click.option("--batch-size", default=10000, show_default=True, type=click.IntRange(1), help="Events per batch and transaction.")
def rebuild(dsn: str | None, replica_dsn: str | None, projection: str, batch_size: int) -> None:
    """Rebuild one read model from the whole event log, without downtime.

    The new tables are built in a shadow schema while the daemon keeps the live ones
    current and readers keep reading them; then, in one transaction, the shadow catches
    up with every event and replaces the live tables. Readers on the primary and the
    replicas see the old read model until that commit and the new one after. A
    materialized view (product_sales) is rebuilt by a refresh. Run it as the role that
    ran the migrations.
    """
    from cqrs_pg.rebuild import rebuild as run_rebuild

    run_rebuild(require_dsn(dsn), projection, batch_size, click.echo)
