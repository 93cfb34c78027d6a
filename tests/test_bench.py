"""`cqrs-pg bench --quick`: it completes, its JSON is well formed, and every variant really
did what it says (rows written, events in the outbox or not). No timing thresholds: the
figures of a 1-second run on a shared machine prove nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cqrs_pg.bench import RATIOS, VARIANTS, capture_function_variant
from tests.conftest import REPO

EVENTS_PER_ORDER = 5  # 2 product updates, 1 order, 2 order lines


def test_bench_quick_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cqrs_pg", "bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[12/12]" in proc.stdout  # progress lines while it runs
    assert "ratios of medians at 4 clients" in proc.stdout

    report = json.loads(out.read_text())
    assert report["command"] == "cqrs-pg bench --quick"
    assert report["config"]["clients"] == [1, 4]
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["server_version"]
    assert report["machine"]["replicas_streaming"] == 1

    keys = [v.key for v in VARIANTS]
    assert set(report["variants"]) == set(keys)
    assert len(report["runs"]) == len(keys) * 2
    for key in keys:
        for clients in ("1", "4"):
            cell = report["medians"][key][clients]
            assert cell["runs"] == 1
            assert cell["min"] <= cell["median"] <= cell["max"]
            assert cell["median"] > 0
    for run in report["runs"]:
        assert run["failed"] == 0, run
        assert run["transactions"] > 0, run
        assert run["other_cpu"] is not None  # own cluster: foreign CPU use is measured
        if run["variant"] in ("d", "e"):
            assert run["daemon_cpu_seconds"] is not None and run["daemon_cpu_seconds"] >= 0
            assert run["daemon_projected_events"] is not None
        else:
            assert run["daemon_cpu_seconds"] is None
        if run["variant"] == "d":
            assert run["daemon_sleeping_at_start"] is True  # idle: asleep when the load started
        if run["variant"] == "e":
            assert run["warmup_transactions"] > 0

    # Every variant wrote what it says: one order per pgbench transaction, 2 lines each;
    # the outbox gets 5 events per command in (b)-(f) and none at all in (a).
    rows = report["rows"]
    for key in keys:
        r = rows[key]
        assert r["orders"] == r["transactions"] > 0, (key, r)
        assert r["order_lines"] == 2 * r["orders"], (key, r)
        if key == "a":
            assert r["outbox_events"] == 0 and r["commands"] == 0, r
        else:
            assert r["outbox_events"] == EVENTS_PER_ORDER * r["orders"], (key, r)
            assert r["commands"] == r["orders"], (key, r)

    ratios = report["ratios"]
    assert ratios["clients"] == 4
    for num, den, target, _what in RATIOS:
        r = ratios[f"{num}/{den}"]
        assert r["value"] > 0 and r["target"] == target
        assert r["met"] is (None if target is None else r["value"] >= target)
    assert set(report["daemon_cpu"]) == {"d", "e"}


DEFINITION = """CREATE OR REPLACE FUNCTION cqrs.tg_capture()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    EXECUTE 'INSERT ...';
    -- The doorbell.
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
    RETURN NULL;
END
$function$
"""


def test_capture_variants_rewrite_only_the_doorbell() -> None:
    quiet = capture_function_variant(DEFINITION, "no_doorbell")
    assert "pg_notify" not in quiet and "cqrs.listeners" not in quiet
    assert "EXECUTE 'INSERT ...';" in quiet and "RETURN NULL;" in quiet
    naive = capture_function_variant(DEFINITION, "always_notify")
    assert "PERFORM pg_notify('cqrs_outbox', '');" in naive and "cqrs.listeners" not in naive
    assert "END IF" not in naive
