"""The README's examples run, through the real psql client, so they cannot rot."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from cqrs_pg import errors
from cqrs_pg_tools.testing import REPO, Database, psql, readme_block, scalar, wait_until

README = (REPO / "README.md").read_text()


def test_psql_example_on_primary_then_replica(db: Database) -> None:
    """Twice on one database, as a reader trying it out would: each run a fresh customer,
    product and order."""
    orders = []
    for _ in range(2):
        out = psql(db.dsn, readme_block("primary"))
        match = re.search(r"order ([0-9a-f-]{36}) token (\d+)", out)
        assert match, out
        orders.append((match.group(1), int(match.group(2))))
    assert orders[0][0] != orders[1][0]

    # The replica block waits on the server until the command's effect has replicated: both
    # run before the projections have applied anything, and finish once they have.
    with ThreadPoolExecutor(len(orders)) as pool:
        reads = [pool.submit(psql, db.replica_dsn, readme_block("replica"), f"token={token}", f"order_id={order_id}")
                 for order_id, token in orders]
        with db.connect_replica() as conn:
            wait_until(lambda: scalar(conn, "SELECT count(*) FROM pg_stat_activity"
                                             " WHERE state = 'active' AND query LIKE 'DO $$%%'") == len(orders),
                       "the README's replica block to wait")
        assert not any(read.done() for read in reads)
        db.run_projections()
        for read in reads:
            assert read.result(timeout=30).split() == ["SET", "SET", "DO", "RESET", "t", "placed|3|1350"]
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM shop.customers").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM shop.products").fetchone() == (2,)


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(python3 -m pip install -e '\.\[test\]'.*?)\n```", README)
    assert len(commands) == 1, "README must name exactly one test command"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci


def test_error_table_matches_the_code() -> None:
    table = README.split("<!-- error-codes -->", 1)[1]
    rows = re.findall(r"^\| (CQ\d{3}) \| `(\w+)` \|", table, re.M)
    assert dict(rows) == {code: cls.__name__ for code, cls in errors.BY_SQLSTATE.items()}
    raised = set()
    for path in (REPO / "sql").rglob("*.sql"):
        raised |= set(re.findall(r"'(CQ\d{3})'", path.read_text()))
    assert raised == set(errors.BY_SQLSTATE)
