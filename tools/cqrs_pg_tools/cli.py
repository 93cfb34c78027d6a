"""The development tools' commands, which `cqrs-pg` lists once this package is installed
(entry points of group ``cqrs_pg.commands``): ``dev`` (a local primary and replicas),
``demo``, ``soak`` (a long chaos run) and ``bench``. None of it ships with the library."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cqrs_pg.config import ListenerConfig
from cqrs_pg_tools.devcluster import ROOT_ENV

F = TypeVar("F", bound=Callable[..., Any])




def root_option(func: F) -> F:
    return click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=ROOT_ENV,
        default=Path(".cqrs-pg"),
        show_default=True,
        help=f"Directory holding the local cluster's data [env {ROOT_ENV}, which `dev up` exports].",
    )(func)


@click.group()
def dev() -> None:
    """A local primary and streaming replica(s) from this machine's PostgreSQL binaries."""


@dev.command("up")
@root_option
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(0, 8))
@click.option("--port", type=click.IntRange(1024, 65535), help="First port (default: free ports).")
def dev_up(root: Path, replicas: int, port: int | None) -> None:
    """Start (or reuse) the cluster and print the export lines for it.

    The lines export CQRS_PG_DSN, CQRS_PG_REPLICA_DSN (with a replica) and
    CQRS_PG_DEV_ROOT, so that in a shell that ran

    \b
    eval "$(cqrs-pg dev up --root /tmp/cqrs-pg)"

    the other commands find the cluster, `cqrs-pg dev status` and `dev down` without
    --root. As root, the servers run as the `postgres` OS user, so the root must be a
    directory it can reach (not under a mode-700 home).
    """
    from cqrs_pg_tools.devcluster import DevCluster

    cluster = DevCluster(root)
    nodes = cluster.up(replicas=replicas, base_port=port)
    for node in nodes:
        click.echo(f"# {node.name}: port {node.port}, data {node.datadir}", err=True)
    click.echo(cluster.export_lines())


@dev.command("down")
@root_option
@click.option("--keep-data", is_flag=True, help="Stop the servers but keep their data.")
def dev_down(root: Path, keep_data: bool) -> None:
    """Stop the cluster and (unless --keep-data) delete it.

    A root that holds no dev cluster is an error (exit 1) and is left as it is.
    """
    from cqrs_pg_tools.devcluster import DevCluster, DevClusterError

    cluster = DevCluster(root)
    if not cluster.holds_cluster():
        raise DevClusterError(
            f"no dev cluster in {cluster.root}: nothing stopped or removed "
            f"(give the --root that `cqrs-pg dev up` used, or set {ROOT_ENV} to it)"
        )
    cluster.down(remove=not keep_data)
    click.echo(f"stopped{'' if keep_data else ' and removed'} {root}")


@dev.command("status")
@root_option
def dev_status(root: Path) -> None:
    """List the cluster's nodes and whether they run."""
    from cqrs_pg_tools.devcluster import DevCluster

    nodes = DevCluster(root).status()
    if not nodes:
        click.echo(f"no cluster under {root}: run `cqrs-pg dev up`")
        return
    for node in nodes:
        click.echo(f"{node.name:<10} {node.role:<8} port {node.port:<6} {'running' if node.running else 'stopped'}  {node.datadir}")


@click.command()
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
    from cqrs_pg_tools.demo import run_demo

    run_demo(clients=clients, seconds=seconds, root=root, keep=keep, echo=click.echo)


@click.command()
@click.option("--seconds", default=120.0, show_default=True, type=click.FloatRange(1), help="How long the writers run.")
@click.option("--writers", default=8, show_default=True, type=click.IntRange(1, 64), help="Concurrent command clients.")
@click.option("--kills", type=click.IntRange(0), help="SIGKILLs of the daemon [default: one per 1.5 s, at least 10].")
@click.option("--terminations", type=click.IntRange(0),
              help="pg_terminate_backend of its connections [default: one per 5 s, at least 3].")
@click.option("--restart-primary/--no-restart-primary", default=True, show_default=True,
              help="Crash and restart the primary once, mid-run.")
@click.option("--seed", type=int, help="Random seed, to repeat a run's fault timetable.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Cluster directory (default: a temporary one, kept when the run fails).")
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
    from cqrs_pg_tools.chaos import soak as run_soak

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
    from cqrs_pg_tools.bench.throughput import BY_KEY

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


@click.command()
@click.option("--parts", default="1,2,3,4,5,6,7", show_default=True, callback=_int_list(1, 7, "1,3"), metavar="N,N,...",
              help="Which parts to run: 1 throughput, 2 catch-up, 3 latency, 4 materialized view, 5 growth, "
                   "6 rebuild, 7 relay.")
@click.option("--rounds", type=click.IntRange(1), help="Interleaved repetitions of every measurement [default: 3].")
@click.option("--seconds", type=click.IntRange(1), help="Part 1: length of each measured pgbench run [default: 10].")
@click.option("--clients", callback=_client_counts, metavar="N,N,...",
              help="Part 1: client counts (pgbench -c N -j 2) [default: 1,4,16].")
@click.option("--variants", callback=_variant_keys, metavar="X,Y,...",
              help="Part 1: run only these variants, e.g. b,c for more rounds of one ratio "
                   "[default: all, a-h; see docs/benchmarks.md].")
@click.option("--warmup", type=click.IntRange(1),
              help="Part 1: seconds of load before the measured run with the daemon running [default: 3].")
@click.option("--backlog", type=click.IntRange(1), metavar="N",
              help="Part 2: events in the large backlog; the small one has N/10 [default: 1000000].")
@click.option("--batch-size", type=click.IntRange(1),
              help=f"Parts 2 and 5: the daemon's --batch-size [default: {ListenerConfig.batch_size}, listen's own].")
@click.option("--batch-delay", type=click.FloatRange(0), metavar="SECONDS",
              help="Every daemon the bench starts gets this --batch-delay [default: listen's own, 0: off].")
@click.option("--apply-budget", type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION",
              help="Every daemon the bench starts gets this --apply-budget [default: listen's own, 0.25].")
@click.option("--refresh-budget", type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION",
              help="Every daemon the bench starts gets this --refresh-budget [default: listen's own, 0.1].")
@click.option("--serial", type=click.IntRange(0), metavar="N",
              help="Part 3: commands one after another, each awaited on the replica before the next; 0: none "
                   "[default: 300].")
@click.option("--rates", callback=_int_list(1, 100_000, "20,100,500"), metavar="N,N,...",
              help="Part 3: arrival rates, commands/s [default: 20,100,500].")
@click.option("--latency-seconds", type=click.FloatRange(0.1), help="Part 3: measured seconds per run [default: 10].")
@click.option("--latency-clients", type=click.IntRange(1, 100),
              help="Parts 3 and 7: connections the commands are spread over [default: 8].")
@click.option("--matview-lines", callback=_int_list(1, 100_000_000, "10000,100000"), metavar="N,N,...",
              help="Part 4: order lines behind product_sales [default: 10000,100000,1000000].")
@click.option("--load-rate", type=click.IntRange(1), help="Part 4: commands/s during the debounce runs [default: 200].")
@click.option("--load-seconds", type=click.IntRange(1), help="Part 4: seconds of each debounce run [default: 20].")
@click.option("--history", callback=_int_list(1, 1_000_000_000, "100000,10000000"), metavar="SMALL,LARGE",
              help="Part 5: outbox rows of the small and the large history [default: 100000,10000000].")
@click.option("--rebuild-orders", type=click.IntRange(1000), metavar="N",
              help="Part 6: orders in the history rebuilt from state and from the log [default: 1000000].")
@click.option("--relay-backlog", type=click.IntRange(1000), metavar="N",
              help="Part 7: events in the backlog the relay drains [default: 1000000].")
@click.option("--relay-batch-size", type=click.IntRange(1, 100_000), metavar="N",
              help="Part 7: the relay's --batch-size, and the direct baseline's batches [default: 1000, the relay's].")
@click.option("--relay-rate", type=click.IntRange(1), metavar="N",
              help="Part 7: commands (and direct publishes) per second in the latency runs [default: 500].")
@click.option("--relay-seconds", type=click.FloatRange(0.1), help="Part 7: measured seconds per latency run [default: 10].")
@click.option("--quick", is_flag=True,
              help="Every part tiny (1 round, seconds each): checks that it works, measures nothing. "
                   "Options given as well override its sizes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write all runs, medians, ratios and machine info here.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write PNG plots here (part 1: throughput vs clients; part 3: latency percentiles). "
                   "Needs matplotlib: pip install -e 'tools[plots]'.")
@click.option("--dsn", metavar="DSN",
              help="Use this server (creates and drops databases; needs superuser) instead of a throwaway primary + replica.")
@click.option("--replica-dsn", metavar="DSN", help="With --dsn: its streaming replica, where part 3 watches (default: the primary).")
@click.pass_context
# ctx positional-only, or click's typed pass_context cannot tell it from **options
def bench(ctx: click.Context, /, quick: bool, json_path: Path | None, plots_dir: Path | None, **options: Any) -> None:
    """Measure what the design costs, each figure beside a baseline from the same run.

    \b
    1. command throughput of place_order at 1, 4, 16 clients (pgbench) beside plain SQL,
       the outbox without wake-up (no daemon, or a daemon that only polls) and the naive
       NOTIFY-per-command
    2. projection catch-up: a backlog drained by `cqrs-pg listen` into every read model,
       beside a raw set-based upsert of the same events; the daemon's peak memory
    3. end-to-end latency: commit -> row in order_summary and caught_up(token) on the
       replica, p50/p95/p99 one after another and at fixed arrival rates, beside the bare
       replication latency; one after another also a consistent read through Router
    4. refresh time of product_sales at 10k, 100k, 1M order lines; refresh count with and
       without the debounce under a steady load
    5. per-batch read cost and command latency with 100k vs 10M outbox rows, with plans;
       prune time and disk freed at 10M
    6. rebuild of order_summary and customer_stats from the write model's state beside
       from the whole event log, at 1M orders
    7. `cqrs-pg relay` draining 1M events into NATS JetStream, and command -> message
       latency at 500/s, beside the same messages published straight to JetStream
       (a nats-server of the bench's own)

    Every figure is a median of interleaved rounds with its min-max spread. Progress goes
    to stderr, the tables to stdout. On a throwaway primary + replica it takes about 45
    minutes with the defaults; see docs/benchmarks.md.
    """
    from cqrs_pg_tools.bench import BenchConfig, run_bench

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
    config = BenchConfig.quick_config(**connection, **overrides) if quick else BenchConfig(**connection, **overrides)
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
