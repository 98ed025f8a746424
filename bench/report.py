"""Medians over the benchmark's repetitions, the table it prints and the plot it draws."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

LATENCIES = ("p50", "p99", "p999")
# Issue 8's CPU targets (150 µs a transaction, stretch 100) beside what a bare trio
# forwarder cost on the machine they were set on (about 25 µs): as multiples of it.
TARGET_TIMES_BARE, STRETCH_TIMES_BARE = 150 / 25, 100 / 25


def _case(run: dict[str, Any]) -> str:
    rate = run["target_tps"]
    return "closed" if rate is None else f"{rate:g}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case (rate, or closed loop) and target: the medians over repetitions, failures
    summed, the latency the proxy adds over the direct run, and the proxy's CPU as a
    multiple of the bare forwarder's (closed loop)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(_case(run), run["target"])].append(run)
    rows = []
    for (case, target), group in groups.items():
        row: dict[str, Any] = {"case": case, "target": target, "repeats": len(group)}
        row["throughput_tps"] = statistics.median(r["throughput_tps"] for r in group)
        for name in LATENCIES:
            row[f"{name}_ms"] = statistics.median(r["latency_ms"][name] for r in group)
        for name in (
            "proxy_cpu_us_per_txn",
            "forwarder_cpu_us_per_txn",
            "postgres_cpu_us_per_row",
            "switches_cpu_us_per_txn",
            "load_cpu_us_per_txn",
            "proxy_rss_mb",
        ):
            if all(name in r for r in group):
                row[name] = statistics.median(r[name] for r in group)
        row["errors"] = sum(r["answered"] - r["approved"] + r["broken"] for r in group)
        row["unsent"] = sum(r["unsent"] for r in group)
        row["timeouts"] = sum(r["timeouts"] for r in group)
        if target == "proxy":
            row["journal_matches"] = all(r["journal_rows"] == r["answered"] for r in group)
        rows.append(row)
    by_key = {(row["case"], row["target"]): row for row in rows}
    for row in rows:
        direct = by_key.get((row["case"], "direct"))
        if row["target"] == "proxy" and direct is not None:
            for name in ("p50", "p99"):
                row[f"added_{name}_ms"] = round(row[f"{name}_ms"] - direct[f"{name}_ms"], 3)
        bare = by_key.get((row["case"], "bare"))
        if (
            row["target"] == "proxy"
            and bare
            and bare.get("forwarder_cpu_us_per_txn")  # 0: too short a run to tell
            and "proxy_cpu_us_per_txn" in row
        ):
            row["cpu_times_bare"] = round(
                row["proxy_cpu_us_per_txn"] / bare["forwarder_cpu_us_per_txn"], 2
            )
    return rows


def table(result: dict[str, Any]) -> str:
    """The medians as a text table, then the idle run."""
    head = (
        f"{'case':>7} {'target':<7}{'tps':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99.9':>9}"
        f"{'+p99 ms':>9}{'cpu us/tx':>10}{'pg us/row':>10}{'sw us/tx':>9}{'gen us/tx':>10}"
        f"{'rss MB':>8}{'err':>5}{'t/o':>5}"
        f"{'unsent':>8}"
        f"{'rows ok':>8}"
    )
    lines = [f"iso-proxy benchmark, {result['date']}, {result['machine']}", head]
    for row in result["medians"]:
        lines.append(
            f"{row['case']:>7} {row['target']:<7}{row['throughput_tps']:>8.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['p999_ms']:>9.2f}"
            f"{_maybe(row.get('added_p99_ms'), '.2f'):>9}"
            f"{_maybe(_middle_cpu(row), '.0f'):>10}"
            f"{_maybe(row.get('postgres_cpu_us_per_row'), '.0f'):>10}"
            f"{_maybe(row.get('switches_cpu_us_per_txn'), '.0f'):>9}"
            f"{_maybe(row.get('load_cpu_us_per_txn'), '.0f'):>10}"
            f"{_maybe(row.get('proxy_rss_mb'), '.0f'):>8}{row['errors']:>5}{row['timeouts']:>5}"
            f"{row['unsent']:>8}"
            f"{_maybe(row.get('journal_matches'), ''):>8}"
        )
    for row in result["medians"]:
        if "cpu_times_bare" in row:
            lines.append(
                f"proxy CPU at saturation: {row['cpu_times_bare']:.2f} times the bare trio "
                f"forwarder's in this run (issue 8's targets: {TARGET_TIMES_BARE:.1f}, "
                f"stretch {STRETCH_TIMES_BARE:.1f})"
            )
    idle = result.get("idle")
    if idle:
        active = idle["active"]
        lines.append(
            f"{idle['idle_connections']} idle connections ({idle['idle_failed']} refused): "
            f"proxy RSS "
            f"{idle['proxy_rss_mb_before']:.0f} -> {idle['proxy_rss_mb_idle']:.0f} MB; "
            f"an active client at {active['target_tps']:g} TPS meanwhile: "
            f"{active['throughput_tps']:.0f} tps, p99 {active['latency_ms']['p99']:.2f} ms, "
            f"RSS {idle['proxy_rss_mb_active']:.0f} MB"
        )
    return "\n".join(lines)


def _middle_cpu(row: dict[str, Any]) -> float | None:
    """The CPU a transaction of what stood between load and switch: proxy or forwarder."""
    value: float | None = row.get("proxy_cpu_us_per_txn", row.get("forwarder_cpu_us_per_txn"))
    return value


def _maybe(value: object, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Latency (p50, p99) against throughput, direct and through the proxy; None when
    matplotlib is not installed (the `plot` extra)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional (the plot extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for target, style in (("direct", "--"), ("proxy", "-")):
        rows = sorted(  # by offered load: open-loop rates, then the closed loop
            (r for r in result["medians"] if r["target"] == target),
            key=lambda r: float("inf") if r["case"] == "closed" else float(r["case"]),
        )
        for name, marker in (("p50", "o"), ("p99", "s")):
            axes.plot(
                [r["throughput_tps"] for r in rows],
                [r[f"{name}_ms"] for r in rows],
                style,
                marker=marker,
                label=f"{target} {name}",
            )
    axes.set_xlabel("throughput (transactions/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"iso-proxy vs direct, {result['date']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
