"""PNG plots of a bench report (`cqrs-pg bench --plots DIR`), drawn with matplotlib (the
plots extra: pip install -e 'tools[plots]'):

- throughput.png  part 1: tx/s against clients, one line per variant, min-max as error bars
                  (dashed: a daemon that finds work by polling, the doorbell emptied)
- latency.png     part 3: p50/p95/p99 per arrival rate, end to end beside the replication
                  baseline, min-max as error bars
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cqrs_pg_tools.bench._common import BenchError


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plots needs matplotlib: pip install -e 'tools[plots]'")


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write the plots the report has data for; returns their paths."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    parts = report.get("parts", {})
    if "throughput" in parts:
        written.append(_throughput(parts["throughput"], directory / "throughput.png", report))
    if "latency" in parts:
        written.append(_latency(parts["latency"], directory / "latency.png", report))
    return written


def _subtitle(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    quick = " — --quick: not a measurement" if report.get("quick") else ""
    return f"{m.get('cpu_count')} CPUs, PostgreSQL {m.get('server_version')}, {report.get('created_at', '')}{quick}"


def _errors(cells: list[dict[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    mid = [c["median"] if c else float("nan") for c in cells]
    low = [c["median"] - c["min"] if c else 0.0 for c in cells]
    high = [c["max"] - c["median"] if c else 0.0 for c in cells]
    return mid, [low, high]


def _throughput(part: dict[str, Any], path: Path, report: dict[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    clients = part["config"]["clients"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key, meta in part["variants"].items():
        cells = [part["medians"].get(key, {}).get(str(c)) for c in clients]
        mid, err = _errors(cells)
        polling = meta.get("capture") == "no_doorbell" and meta.get("daemon", "stopped") != "stopped"
        ax.errorbar(clients, mid, yerr=err, marker="o", capsize=3, linestyle="--" if polling else "-",
                    label=f"({key}) {meta['label']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("clients (pgbench -c)")
    ax.set_ylabel("transactions per second (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"shop.place_order (2 lines): throughput vs clients\n{_subtitle(report)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(part: dict[str, Any], path: Path, report: dict[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    rates = part["config"]["schedules"]
    series = [
        ("command", "p{}_ms", "command -> order_summary row on the replica"),
        ("command", "caught_up_p{}_ms", "command -> caught_up(token) on the replica"),
        ("replication", "p{}_ms", "baseline: plain row replicated"),
    ]
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 5), squeeze=False)
    width = 0.26
    for ax, rate in zip(axes[0], rates, strict=True):
        for k, (kind, key, label) in enumerate(series):
            cell = part["results"][kind][rate]
            cells = [cell.get(key.format(p)) for p in (50, 95, 99)]
            mid, err = _errors(cells)
            xs = [x + (k - 1) * width for x in range(3)]
            bars = ax.bar(xs, mid, width, yerr=err, capsize=3, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(3), ["p50", "p95", "p99"])
        ax.set_title("one after another" if rate == "serial" else f"{rate} commands/s (open loop)", fontsize=10)
        ax.set_ylabel("ms after commit (median, min-max)")
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.suptitle(f"end-to-end latency, watched on the {part['config']['watched_on']}\n{_subtitle(report)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
