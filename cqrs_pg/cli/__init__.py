"""The `cqrs-pg` command line."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import click
import psycopg

from cqrs_pg import __version__
from cqrs_pg.config import MAX_INTEGER, ListenerConfig, option_settings
from cqrs_pg.daemon import Listener
from cqrs_pg.db import DSN_ENV, REPLICA_DSN_ENV, require_dsn
from cqrs_pg.errors import CqrsPgError, first_line

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


# The development tools' commands (the cqrs-pg-tools package, from a checkout: tools/),
# listed once it is installed; named here so that without it they say where they are.
TOOLS = {
    "dev": "a local primary and streaming replicas",
    "demo": "the first run, on a throwaway primary and replica",
    "soak": "a long chaos run",
    "bench": "the benchmarks",
}
TOOLS_HINT = "python3 -m pip install -e tools   (from a checkout of cqrs_pg)"


class Group(click.Group):
    """Turns operational errors into one line and exit code 1, never a traceback; adds the
    development tools' commands when they are installed."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CqrsPgError as exc:
            raise click.ClickException(str(exc)) from exc
        except psycopg.Error as exc:  # what no command turned into its own line: the server's
            raise click.ClickException(_server_error(exc)) from exc

    def _tools(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group="cqrs_pg.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._tools()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        tool = self._tools().get(cmd_name)
        if tool is not None:
            loaded: click.Command = tool.load()
            return loaded
        if cmd_name in TOOLS:
            return _missing_tool(cmd_name)
        return None


def _server_error(exc: psycopg.Error) -> str:
    """A server's error as one line: its message, its SQLSTATE, and for a privilege the
    login had not, which role to connect as."""
    message = exc.diag.message_primary or first_line(exc)
    line = f"{message} [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else message
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        line += ": connect as a login granted what this command needs (README, Roles and privileges)"
    return line


def _missing_tool(name: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"{TOOLS[name].capitalize()}: a development tool, not installed ({TOOLS_HINT}).")
    def missing() -> None:
        raise click.ClickException(f"cqrs-pg {name} is a development tool, not installed: {TOOLS_HINT}")

    return missing


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cqrs-pg")
def main() -> None:
    """CQRS built from PostgreSQL itself.

    Commands are SQL functions; triggers append their events to cqrs.outbox; `cqrs-pg
    listen` keeps the read models up to date; reads go to a streaming replica, with
    cqrs.caught_up(token) for read-your-writes. `cqrs-pg migrate` installs the engine
    (--example shop: the example domain too).
    """


@main.command()
@connection_options
@click.option("--to", "to", default="head", show_default=True, metavar="REV",
              help="Target revision: head, a revision, or base (removes everything the engine and the example created).")
@click.option("--example", type=click.Choice(["shop"]), help="Also install (or upgrade) this example domain.")
def migrate(dsn: str | None, replica_dsn: str | None, to: str, example: str | None) -> None:
    """Install or upgrade the engine (schema cqrs and its roles), and with --example shop
    the example domain too.

    The same as `alembic upgrade cqrs@head` (with --example: `alembic upgrade heads`) with
    CQRS_PG_DSN set. A plain migrate leaves an installed example as it is. Runs on the
    primary only.
    """
    from cqrs_pg.migrate import describe
    from cqrs_pg.migrate import migrate as run_migrate

    before, after = run_migrate(require_dsn(dsn), to, example)
    if before == after:
        click.echo(f"already at {describe(after)}")
    else:
        click.echo(f"migrated {describe(before)} -> {describe(after)}")


def listen_settings(func: F) -> F:
    """The daemon's settings as options, each with its default and help from
    cqrs_pg.config; their bounds are checked there, once."""
    from cqrs_pg.retention import Duration, format_duration

    for f in reversed(option_settings()):
        integral = f.type in ("int", "int | None")
        duration = f.metadata["duration"]
        func = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            default=format_duration(f.default) if duration and f.default is not None else f.default,
            show_default=f.default is not None,
            type=Duration() if duration else click.INT if integral else click.FLOAT,
            metavar=f.metadata["metavar"],
            help=f.metadata["help"],
        )(func)
    return func


@main.command()
@connection_options
@listen_settings
@click.option("--projection", "projections", multiple=True, metavar="NAME", help="Run only this projection (repeatable; default: all).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line.",
)
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import this module first: it registers python projection handlers (repeatable).",
)
def listen(
    dsn: str | None,
    replica_dsn: str | None,
    projections: tuple[str, ...],
    log_level: str,
    log_format: str,
    imports: tuple[str, ...],
    **settings: Any,
) -> None:
    """Run the projection daemon until SIGTERM or SIGINT.

    Woken by LISTEN/NOTIFY, polling as a fallback. Opens one connection to listen and
    one per projection, and runs the projections in parallel. On SIGTERM/SIGINT it
    finishes the batch in hand and exits 0. Safe to kill at any moment: each batch
    commits together with its checkpoint.

    A projection's failure never ends it: a failing batch is retried, narrowed to the
    event that fails, and that event halts its projection (see `cqrs-pg status`,
    `retry`, `skip`) or is parked, by the projection's policy; the others go on.
    Projections registered or removed while it runs are picked up or let go.
    """
    from cqrs_pg.logs import setup_logging
    from cqrs_pg.projections import import_modules

    config = ListenerConfig(dsn=require_dsn(dsn), projections=list(projections) or None, **settings)
    setup_logging(log_level, log_format)
    import_modules(imports)
    listener = Listener(config)

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger("cqrs_pg.daemon").info("received %s: finishing", signal.Signals(signum).name)
        listener.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener.run()


@main.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (fields: docs/production.md).")
@click.option(
    "--max-events-behind",
    type=click.IntRange(0),
    metavar="N",
    help="Unhealthy when a projection (or subscription) has more than N events not yet applied (acknowledged).",
)
@click.option(
    "--max-seconds-behind",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Unhealthy when a projection's oldest unapplied event (a subscription's oldest unacknowledged) is older than this.",
)
@click.option(
    "--max-replica-lag",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Unhealthy when a replica's replay lags more than this.",
)
@click.option(
    "--max-replica-lag-bytes",
    type=click.IntRange(0),
    metavar="BYTES",
    help="Unhealthy when a replica's replay lags more WAL than this.",
)
def status(
    dsn: str | None,
    replica_dsn: str | None,
    as_json: bool,
    max_events_behind: int | None,
    max_seconds_behind: float | None,
    max_replica_lag: float | None,
    max_replica_lag_bytes: int | None,
) -> None:
    """Show each projection's and subscription's progress, replica lag and what holds the fence back.

    Exit code: 0 healthy; 3 unhealthy (a projection is halted, a threshold given is
    passed, or a replica of --replica-dsn is unreachable or not a standby); 1 status could
    not be read. So it
    serves as a liveness/readiness probe.
    """
    from cqrs_pg.status import UNHEALTHY, Thresholds, collect, render

    thresholds = Thresholds(max_events_behind, max_seconds_behind, max_replica_lag, max_replica_lag_bytes)
    report = collect(require_dsn(dsn), replica_dsn, thresholds)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if not report["healthy"]:
        raise SystemExit(UNHEALTHY)


@main.command()
@connection_options
@click.argument("projection", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def parked(dsn: str | None, replica_dsn: str | None, projection: str | None, as_json: bool) -> None:
    """List the events projections set aside or operators skipped.

    Each with its projection, position, event type, outcome (parked: its projection's
    policy is park and it failed after every retry; skipped: `cqrs-pg skip`), the error
    and SQLSTATE it failed with, the tries, and when. `cqrs-pg retry PROJECTION` applies
    the parked ones again.
    """
    from cqrs_pg.failures import parked as list_parked
    from cqrs_pg.failures import render

    rows = list_parked(require_dsn(dsn), projection)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else render(rows))


@main.command()
@connection_options
@click.argument("projection")
def retry(dsn: str | None, replica_dsn: str | None, projection: str) -> None:
    """Try a halted projection's failing event again; apply its parked events again.

    A running daemon picks it up within a second or two. Refused, changing nothing, when
    the projection is not halted and has no parked events.
    """
    from cqrs_pg.failures import retry as run_retry

    halted_at, queued = run_retry(require_dsn(dsn), projection)
    done = []
    if halted_at is not None:
        done.append(f"running again from event {halted_at}, the one it halted at")
    if queued:
        done.append(f"{queued} parked event{'' if queued == 1 else 's'} queued to be applied again")
    click.echo(f"{projection}: {'; '.join(done)} (a running daemon picks it up)")


@main.command()
@connection_options
@click.argument("projection")
@click.option("--position", required=True, type=click.IntRange(1, 2**63 - 1), metavar="N",
              help="The event the projection is halted at (cqrs-pg status names it).")
def skip(dsn: str | None, replica_dsn: str | None, projection: str, position: int) -> None:
    """Leave out the event a halted projection stopped at, and go on after it.

    The event is recorded as skipped (`cqrs-pg parked` lists it) and never applied.
    Refused, changing nothing, for any other position or a projection that is not halted.
    """
    from cqrs_pg.failures import skip as run_skip

    run_skip(require_dsn(dsn), projection, position)
    click.echo(f"{projection}: event {position} skipped (listed by `cqrs-pg parked`); it goes on after it")


@main.command()
@connection_options
@click.option("--keep", default="7d", show_default=True, metavar="DURATION",
              help="Keep history younger than this: 0s, 30m, 12h, 7d.")
@click.option("--dry-run", is_flag=True, help="Print what would be dropped; change nothing.")
def prune(dsn: str | None, replica_dsn: str | None, keep: str, dry_run: bool) -> None:
    """Drop outbox history that every projection and subscription has passed and that is older than --keep.

    The outbox is partitioned by position, 1,000,000 positions a partition; whole
    partitions are dropped, oldest first, never rows deleted: a partition goes once every
    projection and rebuild has applied all of it, every subscription's cursor (the
    relay's too) is past it, none of its events is parked, and its
    newest event is older than --keep. What remains is one unbroken stretch of history.
    Dropping takes a brief lock on the outbox (at most 5 s waited for it). Once history
    is gone, a projection can be rebuilt only from the write model's state (`cqrs-pg
    rebuild`). `cqrs-pg listen --prune-keep` does the same on a schedule.
    """
    from cqrs_pg.retention import parse_duration
    from cqrs_pg.retention import prune as run_prune
    from cqrs_pg.retention import render as render_prune

    click.echo(render_prune(run_prune(require_dsn(dsn), parse_duration(keep), dry_run)))


@main.command()
@connection_options
@click.option("--to", "url", required=True, metavar="nats://HOST:PORT", help="The NATS server (JetStream enabled).")
@click.option("--stream", default="CQRS", show_default=True, metavar="NAME",
              help="The JetStream stream; created if missing, taking the subjects PREFIX.>.")
@click.option("--subject-prefix", default="cqrs", show_default=True, metavar="PREFIX",
              help="Subjects are PREFIX.<aggregate_type>.<event_type>.")
@click.option("--subscription", metavar="NAME",
              help="The relay's resume point, a subscription (created if missing) [default: relay:<stream>]. "
                   "Relays sharing it take turns, never publishing an event twice.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100000), metavar="N",
              help="Events per poll, published before the batch is acknowledged.")
@click.option("--from-now", is_flag=True,
              help="A new subscription starts after the events committed so far (default: at the oldest event held).")
@click.option("--duplicate-window", default="2m", show_default=True, metavar="DURATION",
              help="A stream the relay creates keeps message ids this long, to drop a batch published again.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT", help="Serve Prometheus metrics on this port.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
              help="json: one JSON object per line.")
def relay(dsn: str | None, replica_dsn: str | None, url: str, stream: str, subject_prefix: str, subscription: str | None,
          batch_size: int, from_now: bool, duplicate_window: str, metrics_port: int | None, log_level: str,
          log_format: str) -> None:
    """Publish every event to a NATS JetStream stream, until SIGTERM or SIGINT.

    Each event becomes one message on PREFIX.<aggregate_type>.<event_type> (wildcards and
    whitespace in a type are percent-encoded), its body a JSON object (position,
    event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata,
    occurred_at), its header Nats-Msg-Id its position. Events go out in outbox order:
    each aggregate's in version order. A batch is acknowledged in the database only
    once the broker has stored every message of it; one published again after a crash
    is dropped by the stream by message id, within its duplicate window. While the broker
    or the database is away the relay says so in one line and retries with backoff. The
    login needs only the role cqrs_consumer. On SIGTERM it finishes the batch in hand and
    exits 0.
    """
    import asyncio

    from cqrs_pg.logs import setup_logging
    from cqrs_pg.relay import Relay, RelayConfig
    from cqrs_pg.retention import parse_duration

    window = parse_duration(duplicate_window)
    config = RelayConfig(dsn=require_dsn(dsn), url=url, stream=stream, subject_prefix=subject_prefix,
                         subscription=subscription, batch_size=batch_size, from_beginning=not from_now,
                         duplicate_window=window, metrics_port=metrics_port)
    setup_logging(log_level, log_format)

    async def serve() -> None:
        runner = Relay(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stopping, runner, sig)
        await runner.run()

    def _stopping(runner: Relay, sig: signal.Signals) -> None:
        logging.getLogger("cqrs_pg.relay").info("received %s: finishing", sig.name)
        runner.stop()

    asyncio.run(serve())


@main.command()
@connection_options
@click.argument("projection")
@click.option("--batch-size", default=10000, show_default=True, type=click.IntRange(1, MAX_INTEGER),
              help="Events per batch and transaction.")
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import this module first: it registers the python projection's handler (repeatable), as for listen.",
)
@click.option("--abort", is_flag=True,
              help="Abandon an interrupted rebuild of PROJECTION instead (its shadow tables go; the live ones stay).")
@click.option("--from", "source", type=click.Choice(["state", "log"]),
              help="state: load from the write model's current state (the default when the projection declares a "
                   "state function); log: replay the whole event log (the default otherwise).")
def rebuild(dsn: str | None, replica_dsn: str | None, projection: str, batch_size: int, imports: tuple[str, ...],
            abort: bool, source: str | None) -> None:
    """Rebuild one read model, without downtime, from the write model's state or the log.

    The new tables are built in a shadow schema while the daemon keeps the live ones
    current and readers keep reading them. A projection that declares a state function
    (how its read model is computed from the write model) is loaded from that, under one
    snapshot, and then applies only the events that snapshot did not see: its time grows
    with the read model, not with the history, and it needs no pruned history. Otherwise
    every event of the log is applied again. Then, in one transaction, the shadow catches
    up with every event and replaces the live tables. Readers on the primary and the
    replicas see the old read model until that commit and the new one after. A python
    projection is rebuilt by its handler (give its module with --import, as to listen);
    a materialized view (product_sales) by a refresh. Run it as the role that ran the
    migrations.

    What deployers added to a table (grants, comment, row-level security and policies,
    triggers, publications, replica identity, sequences) goes over to the new one; what
    cannot (a dependent view, a foreign key from another table) refuses the rebuild
    before it starts. One rebuild of a projection at a time; an interrupted one shows in
    `cqrs-pg status` and is abandoned with --abort.
    """
    from cqrs_pg.projections import import_modules
    from cqrs_pg.rebuild import abort as run_abort
    from cqrs_pg.rebuild import rebuild as run_rebuild

    if abort:
        run_abort(require_dsn(dsn), projection)
        click.echo(f"abandoned the rebuild of {projection}: its shadow tables are gone, the live ones untouched")
        return
    import_modules(imports)

    def stopped(signum: int, frame: object) -> None:
        # SIGTERM (a service manager's stop) as Ctrl-C: the rebuild abandons its shadow
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    run_rebuild(require_dsn(dsn), projection, batch_size, click.echo, source)


@main.command()
@connection_options
@click.argument("projection", required=False)
@click.option("--wait", default=30.0, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="How long to wait for a projection behind the log to catch up before giving up on it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def verify(dsn: str | None, replica_dsn: str | None, projection: str | None, wait: float, as_json: bool) -> None:
    """Compare each read model with its definition computed from the write model.

    One line per table or view: `equal`, or how many rows differ (counted both ways). A
    sql or python projection is compared with what its state function computes; a
    materialized view with its own query; both in one snapshot, in a transaction rolled
    back afterwards. A projection still applying events that snapshot sees is compared
    again until it has caught up (at most --wait). Exits 3 on a difference, or when a
    projection is halted or stays behind. Run it on the primary, as the engine's owner.
    """
    from cqrs_pg.verify import FAILING
    from cqrs_pg.verify import render as render_verify
    from cqrs_pg.verify import verify as run_verify

    results = run_verify(require_dsn(dsn), projection, wait)
    click.echo(json.dumps(results, indent=2) if as_json else render_verify(results, wait))
    if any(r["outcome"] in FAILING for r in results):
        raise SystemExit(3)
