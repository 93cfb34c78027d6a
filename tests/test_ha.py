"""Several daemons against one database: safe at any moment, sharing the work, and the
survivor carries on within the documented 5 s when one dies (README: "when one dies the
others carry on at their next poll (tested: within 5 s)")."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections import Counter

import pytest
from psycopg.types.json import Jsonb

from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    PROJECTIONS,
    DaemonProcess,
    Database,
    applied_counts,
    make_root,
    outbox_count,
    scalar,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult

pytestmark = pytest.mark.slow

TAKEOVER_BOUND = 5.0  # seconds, as the README documents it
BATCH = re.compile(r" DEBUG cqrs_pg\.daemon: (\w+): applied (\d+) events in ")


def applied_in(log: str) -> Counter[str]:
    """Events a daemon applied, per projection, from its log of committed batches."""
    applied: Counter[str] = Counter()
    for name, n in BATCH.findall(log):
        applied[name] += int(n)
    return applied


def run_writers(workload: ShopWorkload, commands: int) -> WorkloadResult:
    box: list[WorkloadResult] = []
    writers = threading.Thread(target=lambda: box.append(workload.run(6, commands_per_client=commands)))
    writers.start()
    writers.join()
    (result,) = box
    assert not result.errors, result.errors[:3]
    return result


def test_two_daemons_share_the_work_and_survive_one_dying(db: Database) -> None:
    workdir = make_root("cqrs-pg-ha-")
    daemons = [
        DaemonProcess(db.dsn, workdir / f"listen{i}.log",
                      "--batch-size", "20", "--poll-interval", "0.2", "--log-level", "debug")
        for i in range(2)
    ]
    for d in daemons:
        d.start()
    try:
        with db.connect() as conn:
            wait_until(lambda: scalar(conn, "SELECT count(*) FROM cqrs.listeners") == 2, "both daemons to register")
        workload = ShopWorkload(db.dsn, seed=5, hold_max=0.01)
        workload.setup(customers=10, products=5, stock=500)
        first = run_writers(workload, 60)
        db.wait_caught_up(first.max_token)

        # Both took batches of every kind of work, and together applied each event once:
        # their logged batches add up to the outbox, per projection.
        with db.connect() as conn:
            total = outbox_count(conn)
            assert applied_counts(conn) == dict.fromkeys(PROJECTIONS, total)
        both = dict.fromkeys(PROJECTIONS, total)
        wait_until(lambda: dict(applied_in(daemons[0].output) + applied_in(daemons[1].output)) == both,
                   "the two daemons' logged batches to add up to the outbox")
        before_kill = [applied_in(d.output) for d in daemons]
        assert all(sum(applied.values()) > 0 for applied in before_kill), before_kill

        # One dies without a word (idle, maybe holding a projection's lock between polls);
        # the survivor alone applies every later event, each once, the first within the bound.
        killed_at = time.monotonic()
        daemons[0].kill()
        with db.connect() as conn:
            token = scalar(
                conn,
                "SELECT token FROM shop.place_order(%s, %s, %s)",
                (uuid.uuid4(), workload.customers[0], Jsonb([{"sku": workload.skus[0], "quantity": 1}])),
            )
        db.wait_caught_up(token, timeout=max(0.0, TAKEOVER_BOUND - (time.monotonic() - killed_at)))  # on the replica
        second = run_writers(workload, 20)
        db.wait_caught_up(second.max_token)

        assert daemons[1].stop() == 0
        with db.connect() as conn:
            total_after = outbox_count(conn)
            assert applied_counts(conn) == dict.fromkeys(PROJECTIONS, total_after)
            assert all_mismatches(conn) == NO_MISMATCH
        with db.connect_replica() as replica:
            assert all_mismatches(replica) == NO_MISMATCH
        survivor_after = applied_in(daemons[1].output) - before_kill[1]
        assert total_after > total
        assert dict(survivor_after) == dict.fromkeys(PROJECTIONS, total_after - total)
    finally:
        for d in daemons:
            if d.alive():
                d.kill()
    shutil.rmtree(workdir)
