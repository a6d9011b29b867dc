"""Turn loaded runs into one row per run: a Markdown table, summary.csv and summary.png."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmoe.analyze.runs import Run

# (summary key, column title, format); the seed's table, in its order.
CORE_COLUMNS = (
    ("tok_s", "tok/s", "{:.2f}"),
    ("expert_io_ms_per_token", "expert I/O ms/token", "{:.1f}"),
    ("fetch_gbps", "fetch GB/s", "{:.2f}"),
    ("fetch_vs_probe", "fetch_vs_probe", "{:.2f}"),
    ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
)
# Quality columns appear only when some run measured them (task=ppl).
QUALITY_COLUMNS = (
    ("ppl", "ppl", "{:.3f}"),
    ("kl_mean", "kl_mean", "{:.4f}"),
    ("top1_agreement", "top1_agreement", "{:.3f}"),
)
# Batched-bench columns (task=bench task.concurrency=N) replace the core ones when present.
BATCH_COLUMNS = (
    ("tok_s_aggregate", "aggregate tok/s", "{:.2f}"),
    ("tok_s_per_sequence", "tok/s per sequence", "{:.2f}"),
    ("expert_gb_per_token", "expert GB/token", "{:.4f}"),
    ("union_experts_per_token", "experts/token after union", "{:.2f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.0f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.0f}"),
    ("cpu_s_per_token", "CPU s/token", "{:.3f}"),
    ("tokens_match_solo", "tokens = solo", "{}"),
    ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
)
MISSING = "-"


@dataclass(frozen=True, slots=True)
class Row:
    """One run's line in the table: its swept settings and its summary (medians over repeats)."""

    run: str
    swept: dict[str, str | None]  # swept key -> value, in swept-key order
    metrics: dict[str, Any]  # every run_summary key, numbers as medians; always has "status"
    repeats: int  # run_summary events found
    tokens: int  # token_sampled events found


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs, in the order they were first given."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.overrides))
    return [k for k in keys if len({run.setting(k) for run in runs}) > 1]


def summarize(runs: list[Run]) -> list[Row]:
    """One Row per run, sorted by the swept values (numbers numerically), then by run name."""
    keys = swept_keys(runs)
    rows = [
        Row(
            run=run.name,
            swept={k: run.setting(k) for k in keys},
            metrics=_merge_summaries(run),
            repeats=len(run.summaries),
            tokens=run.tokens,
        )
        for run in runs
    ]
    return sorted(rows, key=lambda r: (tuple(_sort_key(v) for v in r.swept.values()), r.run))


def _merge_summaries(run: Run) -> dict[str, Any]:
    if not run.summaries:
        status = "no_summary" if run.has_log else "no_log"
        return {"status": status}
    merged: dict[str, Any] = {}
    keys = dict.fromkeys(k for s in run.summaries for k in s if k not in ("event", "timestamp"))
    for key in keys:
        values = [s[key] for s in run.summaries if key in s]
        merged[key] = _merge(values)
    merged.setdefault("status", "unknown")
    return merged


def _merge(values: list[Any]) -> Any:
    """Median of numbers; a shared value as is; otherwise each value with its count."""
    if all(_is_number(v) for v in values):
        return statistics.median(values)
    texts = [json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in values]
    counts = Counter(map(str, texts))
    if len(counts) == 1:
        return values[0]
    return "mixed(" + ",".join(f"{v}={n}" for v, n in sorted(counts.items())) + ")"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sort_key(value: str | None) -> tuple[int, float, str]:
    if value is None:
        return (2, 0.0, "")
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def table_columns(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Metric columns to show: the core ones always, ppl/kl/top1 when any run has them."""
    quality = [c for c in QUALITY_COLUMNS if any(c[0] in r.metrics for r in rows)]
    batched = any("tok_s_aggregate" in r.metrics for r in rows)
    return [*(BATCH_COLUMNS if batched else CORE_COLUMNS), ("status", "status", "{}"), *quality]


def to_markdown(rows: list[Row]) -> str:
    """The seed-style pipe table: swept keys, then metrics; a run column when rows need one."""
    keys = list(rows[0].swept) if rows else []
    # Without distinct swept values (repeats in separate dirs) the run path tells rows apart.
    show_run = len({tuple(r.swept.values()) for r in rows}) < len(rows)
    show_repeats = any(r.repeats > 1 for r in rows)
    columns = table_columns(rows)
    header = (["run"] if show_run else []) + keys + [title for _, title, _ in columns]
    align = (["---"] if show_run else []) + ["---:"] * len(keys)
    align += ["---:" if key != "status" else "---" for key, _, _ in columns]
    if show_repeats:
        header.append("repeats")
        align.append("---:")
    lines = [_pipe(header), _pipe(align)]
    for r in rows:
        cells = [r.run] if show_run else []
        cells += [MISSING if v is None else v for v in r.swept.values()]
        cells += [_format(r.metrics.get(key), fmt) for key, _, fmt in columns]
        if show_repeats:
            cells.append(str(r.repeats))
        lines.append(_pipe(cells))
    return "\n".join(lines) + "\n"


def _pipe(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return MISSING
    if _is_number(value):
        return fmt.format(value) if math.isfinite(value) else str(value)
    return str(value)


def to_csv(rows: list[Row]) -> str:
    """Every summary key of every run (medians over repeats), plus run, swept keys and counts."""
    keys = list(rows[0].swept) if rows else []
    metric_keys = list(dict.fromkeys(k for r in rows for k in r.metrics))
    # A summary key that shares a swept key's name (e.g. "hardware") keeps both, renamed.
    metric_names = {k: f"summary.{k}" if k in keys else k for k in metric_keys}
    header = ["run", *keys, "repeats", "tokens", *metric_names.values()]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        metrics = [_csv_cell(r.metrics.get(k)) for k in metric_keys]
        swept = [_csv_cell(v) for v in r.swept.values()]
        writer.writerow([r.run, *swept, r.repeats, r.tokens, *metrics])
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


PLOTTED = (("tok_s", "tok/s"), ("expert_io_ms_per_token", "expert I/O ms/token"))
MAX_BAR_GROUPS = 4  # past this, grouped bars are unreadable: one labelled bar per run instead


def write_plot(rows: list[Row], path: Path) -> None:
    """tok/s and expert I/O ms/token against the first swept key: lines if numeric, else bars."""
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_key = next(iter(rows[0].swept), None) if rows else None
    xs = [r.swept[x_key] if x_key else r.run for r in rows]
    numeric = x_key is not None and all(_sort_key(x)[0] == 0 for x in xs)
    series = _series(rows)
    if not numeric and len(series) > MAX_BAR_GROUPS:
        x_key, xs, series = None, [r.run for r in rows], {"": list(range(len(rows)))}
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, title) in zip(fig.subplots(1, 2), PLOTTED):
        if numeric:
            _plot_lines(ax, rows, xs, series, key)
        else:
            _plot_bars(ax, rows, xs, series, key)
        ax.set_xlabel(x_key or "run")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs {x_key or 'run'}")
        ax.grid(True, alpha=0.3)
    if len(series) > 1:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.savefig(path, format="png", dpi=100)


def _series(rows: list[Row]) -> dict[str, list[int]]:
    """Row indices grouped by the other swept keys, one line or bar colour per group."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        rest = list(r.swept.items())[1:]
        label = ", ".join(f"{k}={MISSING if v is None else v}" for k, v in rest)
        groups.setdefault(label, []).append(i)
    return groups


def _value(row: Row, key: str) -> float:
    v = row.metrics.get(key)
    return float(v) if _is_number(v) else math.nan  # failed runs leave a gap


def _plot_lines(
    ax: Any, rows: list[Row], xs: list[Any], series: dict[str, list[int]], key: str
) -> None:
    for label, idx in series.items():
        ax.plot([float(xs[i]) for i in idx], [_value(rows[i], key) for i in idx], marker="o",
                label=label or None)


def _plot_bars(
    ax: Any, rows: list[Row], xs: list[Any], series: dict[str, list[int]], key: str
) -> None:
    cats = list(dict.fromkeys(MISSING if x is None else x for x in xs))
    width = 0.8 / len(series)
    for n, (label, idx) in enumerate(series.items()):
        pos = [cats.index(MISSING if xs[i] is None else xs[i]) + (n - (len(series) - 1) / 2) * width
               for i in idx]
        ax.bar(pos, [_value(rows[i], key) for i in idx], width=width, label=label or None)
    crowded = len(cats) > 4
    ax.set_xticks(range(len(cats)), cats, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
