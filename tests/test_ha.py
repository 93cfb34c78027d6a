"""Several daemons against one database: safe at any moment, sharing the work, and the
survivors carry on within seconds when one dies."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid

from psycopg.types.json import Jsonb

from cqrs_pg.chaos import DaemonProcess
from cqrs_pg.verify import all_mismatches
from cqrs_pg.workload import ShopWorkload, WorkloadResult
from tests.conftest import Database, make_root

NO_MISMATCH = {"order_summary": 0, "customer_stats": 0, "product_sales": 0}


def applied_by(log_text: str) -> int:
    found = re.findall(r"stopped after applying (\d+) events", log_text)
    assert found, log_text
    return int(found[-1])


def test_two_daemons_share_the_work_and_survive_one_dying(db: Database) -> None:
    workdir = make_root("cqrs-pg-ha-")
    daemons = [
        DaemonProcess(db.dsn, workdir / f"listen{i}.log", "--batch-size", "20", "--poll-interval", "0.2")
        for i in range(2)
    ]
    for d in daemons:
        d.start()
    try:
        workload = ShopWorkload(db.dsn, seed=5, hold_max=0.01)
        workload.setup(customers=10, products=5, stock=500)
        box: list[WorkloadResult] = []
        writers = threading.Thread(target=lambda: box.append(workload.run(6, commands_per_client=60)))
        writers.start()
        writers.join()
        assert not box[0].errors
        db.wait_caught_up(box[0].max_token)

        # One dies without a word; the other must carry every projection alone.
        daemons[0].kill()
        with db.connect() as conn:
            customer = workload.customers[0]
            token = conn.execute(
                "SELECT token FROM shop.place_order(%s, %s, %s)",
                (uuid.uuid4(), customer, Jsonb([{"sku": workload.skus[0], "quantity": 1}])),
            ).fetchone()[0]
        started = time.monotonic()
        db.wait_caught_up(token, timeout=5.0)  # on the replica, within 5 s
        took_over = time.monotonic() - started
        assert took_over < 5.0

        assert daemons[1].stop() == 0
        survivor = applied_by(daemons[1].log.read_text())
        # The killed one logged nothing at exit; count what it applied from the checkpoints.
        with db.connect() as conn:
            outbox = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]
            applied = dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())
            assert applied == dict.fromkeys(NO_MISMATCH, outbox)
            assert all_mismatches(conn) == NO_MISMATCH
        with db.connect_replica() as replica:
            db.wait_caught_up(token)
            assert all_mismatches(replica) == NO_MISMATCH
        assert 0 < survivor < 3 * outbox, "the survivor did all the work: the daemons did not share it"
    finally:
        for d in daemons:
            if d.alive():
                d.kill()
    shutil.rmtree(workdir)
