"""What a newcomer meets when trying cqrs_pg out: the dev cluster found again through
CQRS_PG_DEV_ROOT, `dev down` on a root without a cluster, a refused command's error in
psql, and the daemon's goodbye line. (The tutorials' and the README's own examples are
run by test_tutorial.py, test_aggregate_tutorial.py and test_readme.py.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cqrs_pg.cli import main
from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg_tools.devcluster import ROOT_ENV, DevCluster
from cqrs_pg_tools.testing import (
    PROJECTIONS,
    Daemon,
    Database,
    applied_counts,
    assert_one_line_error,
    cli,
    make_root,
    psql_process,
    scalar,
    wait_until,
)

CQRS_PG = f"{shlex.quote(sys.executable)} -m cqrs_pg"


# -- 1. CQRS_PG_DEV_ROOT: `dev up --root X` once, then no --root ----------------------------


@pytest.mark.slow  # a cluster of its own
def test_dev_commands_find_the_root_that_dev_up_exported() -> None:
    """`eval "$(cqrs-pg dev up --root X)"`, then `dev status`, `dev up` and `dev down`
    without --root, from a directory holding no cluster: each finds X."""
    base = make_root("cqrs-pg-newcomer-")
    root, elsewhere = base / "cluster", base / "elsewhere"
    elsewhere.mkdir()
    script = f"""set -euo pipefail
eval "$({CQRS_PG} dev up --root {shlex.quote(str(root))} --replicas 0)"
echo "root=$CQRS_PG_DEV_ROOT"
{CQRS_PG} dev status
{CQRS_PG} dev up --replicas 0 2>/dev/null | grep '^export {ROOT_ENV}='
{CQRS_PG} dev down
"""
    try:
        done = subprocess.run(["bash", "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"root={root}"
        assert lines[1].split()[:2] == ["primary", "primary"] and " running " in lines[1], lines
        assert str(root / "primary" / "data") in lines[1]
        assert shlex.split(lines[2]) == ["export", f"{ROOT_ENV}={root}"]  # up again: the same cluster
        assert lines[3:] == [f"stopped and removed {root}"]
        assert not root.exists()
        assert list(elsewhere.iterdir()) == []  # no ./.cqrs-pg made on the way
    finally:
        if root.exists():
            DevCluster(root).down()
        shutil.rmtree(base, ignore_errors=True)


def test_dev_status_and_down_default_to_the_environments_root(tmp_path: Path) -> None:
    root = tmp_path / "from-env"
    status = cli("dev", "status", env={ROOT_ENV: str(root)})
    assert status.returncode == 0 and status.stdout == f"no cluster under {root}: run `cqrs-pg dev up`\n"
    assert_one_line_error(cli("dev", "down", env={ROOT_ENV: str(root)}), f"no dev cluster in {root}")
    # --root wins over the variable
    other = tmp_path / "given"
    assert_one_line_error(cli("dev", "down", "--root", str(other), env={ROOT_ENV: str(root)}), f"in {other}:")


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_dev_help_names_the_root_variable(command: str) -> None:
    result = CliRunner().invoke(main, ["dev", command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert ROOT_ENV in result.output


def test_dev_up_exports_its_root(cluster: DevCluster) -> None:
    words = [shlex.split(line) for line in cluster.export_lines().splitlines()]
    assert [w[1].split("=", 1)[0] for w in words] == ["CQRS_PG_DSN", "CQRS_PG_REPLICA_DSN", ROOT_ENV]
    assert words[2] == ["export", f"{ROOT_ENV}={cluster.root}"]
    assert cluster.root.is_absolute()


# -- 2. `dev down` where there is no cluster ------------------------------------------------


def contents(path: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(path)), p.read_text() if p.is_file() else "") for p in path.rglob("*"))


@pytest.mark.parametrize("keep_data", [False, True])
def test_dev_down_without_a_cluster_says_so_and_changes_nothing(tmp_path: Path, keep_data: bool) -> None:
    flags = ["--keep-data"] if keep_data else []
    missing = tmp_path / "never-built"
    line = assert_one_line_error(cli("dev", "down", "--root", str(missing), *flags), f"no dev cluster in {missing}")
    assert "removed" in line and "stopped and" not in line
    assert not missing.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("dev", "down", "--root", str(empty), *flags), f"no dev cluster in {empty}")
    assert empty.is_dir()  # kept, though down would remove the root of a cluster

    foreign = tmp_path / "foreign"
    (foreign / "primary").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "primary" / "other.txt").write_text("also mine")
    before = contents(foreign)
    assert_one_line_error(cli("dev", "down", "--root", str(foreign), *flags), f"no dev cluster in {foreign}")
    assert contents(foreign) == before


# -- 6. a refused command in psql: the one useful line ----------------------------------------

# Each refused call (psql variables :customer, :order from the setup), the message psql
# prints, and the command it names.
REFUSED = [
    ("shop.place_order(gen_random_uuid(), :'customer', '[{\"sku\": \"NEW-1\", \"quantity\": 5}]')",
     "not enough stock of sku 'NEW-1': 5 ordered, 1 in stock"),
    ("shop.register_customer(gen_random_uuid(), 'blank@example.com', '   ')", "name must not be blank, got '   '"),
    # a value with line breaks is shown on one line, escaped
    ("shop.register_customer(gen_random_uuid(), 'tab@example.com', E'\\t\\r\\n')",
     r'name must not be blank, got "\\t\\r\\n"'),
    ("shop.rename_customer(gen_random_uuid(), :'customer', E'Ada\\nLovelace')",
     r'name must not contain control characters, got U\+000A at position 4: "Ada\\nLovelace"'),
    ("shop.cancel_order(gen_random_uuid(), '00000000-0000-4000-8000-000000000000')",
     "order 00000000-0000-4000-8000-000000000000 does not exist"),
    ("shop.register_customer(gen_random_uuid(), 'NEW@example.com', 'Again')", "email 'new@example.com' is already registered"),
    ("shop.rename_customer(gen_random_uuid(), :'customer', 'N', 7)", r"customer \S+ is at version 1, expected version 7"),
    ("shop.add_product(gen_random_uuid(), 'NEW-1', 'Again', 1, 1)", "sku 'NEW-1' is already taken"),
    ("shop.restock(gen_random_uuid(), 'NEW-1', 0)", "quantity must be at least 1, got 0"),
    ("shop.change_price(gen_random_uuid(), 'NOPE-1', 5)", "product with sku 'NOPE-1' does not exist"),
    ("shop.ship_order(gen_random_uuid(), :'order', 0)", "expected_version must be at least 1, got 0"),
    ("shop.cancel_order('00000000-0000-4000-8000-000000000001', :'order')",
     r"command_id \S+ was already used for add_product\(.*\), not for cancel_order\(.*\)"),
]
SETUP = """SELECT aggregate_id AS customer FROM shop.register_customer(gen_random_uuid(), 'new@example.com', 'New') \\gset
SELECT FROM shop.add_product('00000000-0000-4000-8000-000000000001', 'NEW-1', 'New', 10, 2);
SELECT aggregate_id AS order FROM shop.place_order(gen_random_uuid(), :'customer', '[{"sku": "NEW-1", "quantity": 1}]') \\gset
"""


def test_a_refused_command_prints_one_error_line_in_psql(db: Database) -> None:
    """psql with its default verbosity and SHOW_CONTEXT: each refusal prints its ERROR line
    and at most one CONTEXT line, naming the command itself, not the helpers it calls."""
    script = SETUP + "".join(f"SELECT * FROM {call};\n" for call, _ in REFUSED)
    done = psql_process(db.dsn, script, "VERBOSITY=default", "SHOW_CONTEXT=errors", stop_on_error=False)
    assert done.returncode == 0, done.stderr
    chunks = re.split(r"^(?=ERROR:)", done.stderr, flags=re.M)
    assert chunks[0] == "", done.stderr  # nothing before the first error: the setup ran
    errors = [chunk.splitlines() for chunk in chunks[1:]]
    assert len(errors) == len(REFUSED), done.stderr
    for lines, (call, message) in zip(errors, REFUSED, strict=True):
        command = call.split("(", 1)[0]
        assert re.fullmatch(rf"ERROR:  {message}", lines[0]), (call, lines)
        context = [line for line in lines if line.startswith("CONTEXT:")]
        assert len(context) <= 1, (call, lines)
        assert all(re.match(rf"CONTEXT:  PL/pgSQL function {re.escape(command)}\(", line) for line in context), lines
        assert all(line.startswith(("ERROR:", "CONTEXT:")) for line in lines), lines


# -- 7. the daemon's goodbye line ----------------------------------------------------------


def test_listen_says_how_many_events_each_projection_applied(db: Database, daemons: Callable[..., Daemon]) -> None:
    """10 events, 3 projections: "10 events to each of 3 projections", not 30; the batch
    count is the batches it logged."""
    with db.connect() as conn:
        for i in range(10):
            conn.execute("SELECT shop.register_customer(gen_random_uuid(), %s, 'C')", (f"c{i}@example.com",))
        assert scalar(conn, "SELECT count(*) FROM cqrs.outbox") == 10
        daemon = daemons(db, "--batch-size", "3", "--log-level", "debug", "--log-format", "json")
        wait_until(lambda: applied_counts(conn) == dict.fromkeys(PROJECTIONS, 10), "every projection to apply 10 events")
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output
        assert applied_counts(conn) == dict.fromkeys(PROJECTIONS, 10)

    records = [json.loads(line) for line in daemon.output.splitlines() if line.startswith("{")]
    batches = [r for r in records if r["message"].startswith(tuple(f"{p}: applied " for p in PROJECTIONS))]
    assert {p: sum(r["applied"] for r in batches if r["projection"] == p) for p in PROJECTIONS} == dict.fromkeys(PROJECTIONS, 10)
    assert len(batches) > len(PROJECTIONS)  # batches of 3: several per sql projection
    (last,) = [r for r in records if r["message"].startswith("stopped after")]
    assert last["message"] == f"stopped after applying 10 events to each of 3 projections ({len(batches)} batches)"
    assert last["applied_by_projection"] == dict.fromkeys(PROJECTIONS, 10)
    assert last["batches"] == len(batches)


def test_the_goodbye_line_when_projections_applied_different_counts() -> None:
    listener = Listener(ListenerConfig(dsn="host=unused"))
    assert listener.summary() == "stopped after applying no events: no projections"
    listener.applied, listener.batches = {"order_summary": 10, "customer_stats": 4, "product_sales": 0}, 5
    assert listener.summary() == (
        "stopped after applying events to 3 projections (5 batches): order_summary 10, customer_stats 4, product_sales 0"
    )
    assert listener.applied_total == 14
    listener.applied, listener.batches = {"order_summary": 1}, 1
    assert listener.summary() == "stopped after applying 1 event to 1 projection (1 batch)"

