"""`cqrs-pg bench`: what the design costs, each figure beside a baseline taken in the same run.

1. throughput  command throughput of place_order at 1, 4, 16 clients beside plain SQL,
               the outbox without wake-up (no daemon, or a daemon that polls), and the
               naive NOTIFY-per-command (pgbench)
2. catchup     a backlog of mixed shop events drained by the real `cqrs-pg listen` into
               every read model, beside a raw set-based upsert of the same events
3. latency     command commit -> effect visible in order_summary on the replica at fixed
               arrival rates, beside the bare replication latency
4. matview     refresh time of product_sales at growing sizes; refresh count with and
               without the debounce under a steady load
5. growth      per-batch read cost and command latency with a small and a large outbox,
               and what pruning the large one takes and frees
6. rebuild     `cqrs-pg rebuild` from the write model's state beside from the whole log
7. relay       `cqrs-pg relay` draining a backlog into NATS JetStream, and its latency at
               500 commands/s, beside the same messages published straight to JetStream

Everything runs on one throwaway primary + streaming replica (or the server given with
--dsn), in databases cloned from one migrated, seeded template; part 7 publishes to a
nats-server of its own. Every figure is a median of repeated runs with its min-max
spread; runs of a figure and of its baseline are interleaved in a shuffled order. Progress goes to stderr, the tables to stdout.
See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cqrs_pg_tools.bench._common import PART_NAMES, PART_TITLES, BenchConfig, BenchError, Echo, Session
from cqrs_pg_tools.bench.throughput import RATIOS, VARIANTS, doorbell_variant, parse_pgbench

__all__ = [
    "PART_NAMES",
    "RATIOS",
    "VARIANTS",
    "BenchConfig",
    "BenchError",
    "doorbell_variant",
    "parse_pgbench",
    "render",
    "run_bench",
]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stdout(line: str) -> None:
    print(line, flush=True)


def _part_module(part: int) -> Any:
    import importlib

    return importlib.import_module(f"cqrs_pg_tools.bench.{PART_NAMES[part]}")


def run_bench(
    config: BenchConfig,
    echo: Echo | None = None,
    json_path: Path | None = None,
    command: str | None = None,
    *,
    progress: Echo | None = None,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the parts config.parts asks for; progress to `progress` (default stderr), each
    part's table to `echo` (default stdout) as it completes; returns the report."""
    out = echo or _stdout
    progress = progress or _stderr
    if plots_dir is not None:
        from cqrs_pg_tools.bench.plots import require_matplotlib

        require_matplotlib()  # before an hour of benchmarking, not after
    if 7 in config.parts:
        from cqrs_pg_tools.natsserver import nats_server_binary

        try:
            nats_server_binary()
        except RuntimeError as exc:
            raise BenchError(f"part 7 (the relay) needs a nats-server: {exc}") from exc
    if json_path is not None and not json_path.parent.is_dir():
        raise BenchError(f"--json {json_path}: the directory {json_path.parent} does not exist")
    unknown = [p for p in config.parts if p not in PART_NAMES]
    if unknown:
        raise BenchError(f"unknown part(s) {unknown}: the parts are 1-{max(PART_NAMES)}")
    unknown_variants = sorted(set(config.variants or ()) - {v.key for v in VARIANTS})
    if unknown_variants:
        raise BenchError(
            f"unknown part 1 variant(s) {', '.join(unknown_variants)}: the variants are {', '.join(v.key for v in VARIANTS)}"
        )
    session = Session(config, progress)
    ok = False
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cqrs-pg bench",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": config.quick,
        "parts_run": list(config.parts),
        "complete": False,
        "parts": {},
    }

    def save() -> None:
        # After every part too: a failure late in a long run keeps what was measured.
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    try:
        session.start()
        machine = session.machine()
        report["machine"] = machine
        progress(
            f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model'] or 'unknown model'}), "
            f"PostgreSQL {machine['server_version']}, fsync={machine['settings'].get('fsync')}, "
            f"synchronous_commit={machine['settings'].get('synchronous_commit')}"
        )
        load = os.getloadavg()[0]
        if load > 0.5 * (os.cpu_count() or 1):
            progress(f"warning: the machine is busy (load average {load:.1f}): other work will disturb the figures")
        session.prepare_template()
        for part in config.parts:
            name = PART_NAMES[part]
            progress(f"== part {part}: {PART_TITLES[part]} ==")
            module = _part_module(part)
            t0 = time.monotonic()
            result = module.run(session)
            result.setdefault("elapsed_seconds", round(time.monotonic() - t0, 1))
            report["parts"][name] = result
            save()
            out("")
            out(f"== part {part}: {PART_TITLES[part]} ==")
            for line in module.render(result):
                out(line)
        report["targets"] = targets(report)
        report["elapsed_seconds"] = round(time.monotonic() - started, 1)
        for line in render_targets(report["targets"]):
            out(line)
        report["complete"] = ok = True
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        session.cleanup(ok)
        save()
        if json_path is not None:
            progress(f"wrote {json_path}" + ("" if ok else " (incomplete)"))
    if plots_dir is not None:
        from cqrs_pg_tools.bench.plots import write_plots

        for path in write_plots(report, plots_dir):
            progress(f"wrote {path}")
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with the measured value and whether it is met, and where the part
    has one, its baseline from the same run ("baseline": a short text, not judged)."""
    out: list[dict[str, Any]] = []
    for part, name in PART_NAMES.items():
        if name in report["parts"]:
            module = _part_module(part)
            out.extend(module.targets(report["parts"][name]))
    return out


def render_targets(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "== targets =="]
    for t in rows:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        value = t["value"]
        text = (
            "n/a" if value is None
            else f"{value:,.3f}" if isinstance(value, float) and value < 10
            else f"{value:,.1f}" if isinstance(value, float)
            else str(value)
        )
        beside = f"; {t['baseline']}" if t.get("baseline") else ""
        lines.append(f"  part {t['part']}: {t['what']}: {text} (target {t['target']}{beside}): {met}")
    return lines


def render(report: dict[str, Any]) -> list[str]:
    """Every part's table and the targets, from a report (e.g. one read back from --json)."""
    lines: list[str] = []
    for part, name in PART_NAMES.items():
        if name in report.get("parts", {}):
            lines += ["", f"== part {part}: {PART_TITLES[part]} =="]
            lines += _part_module(part).render(report["parts"][name])
    lines += render_targets(report.get("targets", []))
    return lines

