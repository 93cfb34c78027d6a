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
@click.option(
    "--refresh-budget",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    metavar="FRACTION",
    help="At most this share of the time refreshing one materialized view: after a refresh that took "
    "t seconds the next waits at least t/FRACTION (a refresh recomputes the whole view).",
)
@click.option(
    "--batch-delay",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="While events keep coming, start a round of batches at most once per this many seconds: "
    "bigger batches cost the server less; after a quiet spell the next event is applied at once. "
    "0: every event as soon as it can, at more CPU.",
)
@click.option(
    "--apply-budget",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    metavar="FRACTION",
    help="While events keep coming, rounds of batches take at most this share of the time: after a round "
    "whose batches took t seconds of work (commits left out) the next starts t/FRACTION after it (at most "
    "--poll-interval). On a loaded server batches grow and the daemon leaves the commands more CPU; latency "
    "under load grows instead. 1: off.",
)
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
    refresh_budget: float,
    batch_delay: float,
    apply_budget: float,
    projections: tuple[str, ...],
    log_level: str,
    log_format: str,
    stall_warning: float,
    metrics_port: int | None,
    imports: tuple[str, ...],
) -> None:
    """Run the projection daemon until SIGTERM or SIGINT.

    Woken by LISTEN/NOTIFY, polling as a fallback. Opens one connection to listen and
    one per projection, and runs the projections in parallel. On SIGTERM/SIGINT it
    finishes the batch in hand and exits 0. Safe to kill at any moment: each batch
    commits together with its checkpoint.
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
            refresh_budget=refresh_budget,
            batch_delay=batch_delay,
            apply_budget=apply_budget,
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (fields: docs/production.md).")
@click.option("--max-events-behind", type=click.IntRange(0), metavar="N", help="Unhealthy when a projection has more than N events not yet applied.")
@click.option("--max-seconds-behind", type=click.FloatRange(0), metavar="SECONDS", help="Unhealthy when a projection's oldest unapplied event is older than this.")
@click.option("--max-replica-lag", type=click.FloatRange(0), metavar="SECONDS", help="Unhealthy when a replica's replay lags more than this.")
@click.option("--max-replica-lag-bytes", type=click.IntRange(0), metavar="BYTES", help="Unhealthy when a replica's replay lags more WAL than this.")
def status(
    dsn: str | None,
    replica_dsn: str | None,
    as_json: bool,
    max_events_behind: int | None,
    max_seconds_behind: float | None,
    max_replica_lag: float | None,
    max_replica_lag_bytes: int | None,
) -> None:
    """Show each projection's progress, replica lag and what holds the fence back.

    Exit code: 0 healthy; 3 unhealthy (a threshold given is passed, or a replica of
    --replica-dsn is unreachable or not a standby); 1 status could not be read. So it
    serves as a liveness/readiness probe.
    """
    from cqrs_pg.status import UNHEALTHY, Thresholds, collect, render

    thresholds = Thresholds(max_events_behind, max_seconds_behind, max_replica_lag, max_replica_lag_bytes)
    report = collect(require_dsn(dsn), replica_dsn, thresholds)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if not report["healthy"]:
        raise SystemExit(UNHEALTHY)


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


def _client_counts(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(c < 1 or c > 100 for c in counts):
        raise click.BadParameter(f"{value!r}: give client counts from 1 to 100, comma-separated, e.g. 1,4,16")
    return tuple(dict.fromkeys(counts))


def _variant_keys(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    from cqrs_pg.bench.throughput import BY_KEY

    keys = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not keys or any(k not in BY_KEY for k in keys):
        raise click.BadParameter(f"{value!r}: give part 1 variants from {', '.join(BY_KEY)}, comma-separated, e.g. b,c")
    return keys


def _int_list(low: int, high: int, example: str) -> Callable[[click.Context, click.Parameter, str | None], tuple[int, ...] | None]:
    """A click callback: comma-separated integers from low to high (None stays None)."""

    def parse(_ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        try:
            numbers = tuple(int(part.replace("_", "")) for part in value.split(",") if part.strip())
        except ValueError:
            numbers = ()
        if not numbers or any(n < low or n > high for n in numbers):
            raise click.BadParameter(f"{value!r}: give numbers from {low:,} to {high:,}, comma-separated, e.g. {example}")
        return tuple(dict.fromkeys(numbers))

    return parse


@main.command()
@click.option("--parts", default="1,2,3,4,5", show_default=True, callback=_int_list(1, 5, "1,3"), metavar="N,N,...",
              help="Which parts to run: 1 throughput, 2 catch-up, 3 latency, 4 materialized view, 5 growth.")
@click.option("--rounds", type=click.IntRange(1), help="Interleaved repetitions of every measurement [default: 3].")
@click.option("--seconds", type=click.IntRange(1), help="Part 1: length of each measured pgbench run [default: 10].")
@click.option("--clients", callback=_client_counts, metavar="N,N,...", help="Part 1: client counts (pgbench -c N -j 2) [default: 1,4,16].")
@click.option("--variants", callback=_variant_keys, metavar="X,Y,...", help="Part 1: run only these variants, e.g. b,c for more rounds of one ratio [default: all, a-h; see docs/benchmarks.md].")
@click.option("--warmup", type=click.IntRange(1), help="Part 1: seconds of load before the measured run with the daemon running [default: 3].")
@click.option("--backlog", type=click.IntRange(1), metavar="N", help="Part 2: events in the large backlog; the small one has N/10 [default: 1000000].")
@click.option("--batch-size", type=click.IntRange(1), help="Parts 2 and 5: the daemon's --batch-size [default: 5000].")
@click.option("--batch-delay", type=click.FloatRange(0), metavar="SECONDS", help="Every daemon the bench starts gets this --batch-delay [default: listen's own, 0.01].")
@click.option("--apply-budget", type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION", help="Every daemon the bench starts gets this --apply-budget [default: listen's own, 0.25].")
@click.option("--rates", callback=_int_list(1, 100_000, "500,2000"), metavar="N,N,...", help="Part 3: arrival rates, commands/s [default: 500,2000].")
@click.option("--latency-seconds", type=click.FloatRange(0.1), help="Part 3: measured seconds per run [default: 10].")
@click.option("--latency-clients", type=click.IntRange(1, 100), help="Part 3: connections the commands are spread over [default: 8].")
@click.option("--matview-lines", callback=_int_list(1, 100_000_000, "10000,100000"), metavar="N,N,...", help="Part 4: order lines behind product_sales [default: 10000,100000,1000000].")
@click.option("--load-rate", type=click.IntRange(1), help="Part 4: commands/s during the debounce runs [default: 200].")
@click.option("--load-seconds", type=click.IntRange(1), help="Part 4: seconds of each debounce run [default: 20].")
@click.option("--history", callback=_int_list(1, 1_000_000_000, "100000,10000000"), metavar="SMALL,LARGE", help="Part 5: outbox rows of the small and the large history [default: 100000,10000000].")
@click.option("--quick", is_flag=True, help="Every part tiny (1 round, seconds each): checks that it works, measures nothing. Options given as well override its sizes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE", help="Also write all runs, medians, ratios and machine info here.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR", help="Write PNG plots here (part 1: throughput vs clients; part 3: latency percentiles). Needs matplotlib: pip install 'cqrs_pg[bench]'.")
@click.option("--dsn", metavar="DSN", help="Use this server (creates and drops databases; needs superuser) instead of a throwaway primary + replica.")
@click.option("--replica-dsn", metavar="DSN", help="With --dsn: its streaming replica, where part 3 watches (default: the primary).")
@click.pass_context
def bench(ctx: click.Context, quick: bool, json_path: Path | None, plots_dir: Path | None, **options: Any) -> None:
    """Measure what the design costs, each figure beside a baseline from the same run.

    \b
    1. command throughput of place_order at 1, 4, 16 clients (pgbench) beside plain SQL,
       the outbox without wake-up (no daemon, or a daemon that only polls) and the naive
       NOTIFY-per-command
    2. projection catch-up: a backlog drained by `cqrs-pg listen` into every read model,
       beside a raw set-based upsert of the same events; the daemon's peak memory
    3. end-to-end latency: commit -> row in order_summary on the replica, p50/p95/p99 at
       fixed arrival rates, beside the bare replication latency
    4. refresh time of product_sales at 10k, 100k, 1M order lines; refresh count with and
       without the debounce under a steady load
    5. per-batch read cost and command latency with 100k vs 10M outbox rows, with plans

    Every figure is a median of interleaved rounds with its min-max spread. Progress goes
    to stderr, the tables to stdout. On a throwaway primary + replica it takes about 30
    minutes with the defaults; see docs/benchmarks.md.
    """
    from cqrs_pg.bench import BenchConfig, run_bench

    given = {k: v for k, v in options.items() if v is not None and k not in ("dsn", "replica_dsn")}
    if options["replica_dsn"] and not options["dsn"]:
        raise click.UsageError("--replica-dsn goes with --dsn (without --dsn the bench starts its own replica)")
    fields = {"history": tuple(sorted(given["history"])) if "history" in given else None}
    if fields["history"] is not None and len(fields["history"]) != 2:
        raise click.BadParameter(
            f"'{','.join(map(str, options['history']))}': give two sizes, small and large, e.g. 100000,10000000",
            param_hint="--history",
        )
    overrides = {**given, **{k: v for k, v in fields.items() if v is not None}}
    if "backlog" in overrides and overrides["backlog"] < 10:
        raise click.BadParameter(f"{overrides['backlog']}: the backlog must be at least 10 events", param_hint="--backlog")
    connection = {"dsn": options["dsn"], "replica_dsn": options["replica_dsn"]}
    if quick:
        config = BenchConfig.quick_config(**connection, **overrides)
    else:
        config = BenchConfig(**connection, **overrides)
    words = ["cqrs-pg bench"]
    for param in ctx.command.params:
        if param.name in ("json_path", "plots_dir") or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        flag = param.opts[0]
        if param.name == "quick":
            words.append(flag)
        elif param.name in ("dsn", "replica_dsn"):
            words.append(f"{flag} …")
        else:
            value = ctx.params[param.name]
            words.append(f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}")

    def _terminated(signum: int, _frame: object) -> None:
        # Unwind, so the throwaway servers and daemons are stopped on the way out.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    run_bench(config, echo=click.echo, json_path=json_path, command=" ".join(words), plots_dir=plots_dir,
              progress=lambda line: click.echo(line, err=True))


@main.command()
@connection_options
@click.argument("projection")
@click.option("--batch-size", default=10000, show_default=True, type=click.IntRange(1), help="Events per batch and transaction.")
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="Import this module first: it registers the python projection's handler (repeatable), as for listen.")
def rebuild(dsn: str | None, replica_dsn: str | None, projection: str, batch_size: int, imports: tuple[str, ...]) -> None:
    """Rebuild one read model from the whole event log, without downtime.

    The new tables are built in a shadow schema while the daemon keeps the live ones
    current and readers keep reading them; then, in one transaction, the shadow catches
    up with every event and replaces the live tables. Readers on the primary and the
    replicas see the old read model until that commit and the new one after. A python
    projection is rebuilt by its handler (give its module with --import, as to listen);
    a materialized view (product_sales) by a refresh. Run it as the role that ran the
    migrations.
    """
    from cqrs_pg.projections import import_modules
    from cqrs_pg.rebuild import rebuild as run_rebuild

    import_modules(imports)
    run_rebuild(require_dsn(dsn), projection, batch_size, click.echo)
