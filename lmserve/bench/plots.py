"""PNG charts of runs with matplotlib (the optional `plot` extra), imported only when a chart is drawn.

Every chart is drawn from run JSON (records.py), so a run just measured and one read back with
--compare look the same. Older JSON without per-request data still draws on the sweep chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmserve.bench.records import Series, step_name

MISSING = "--plot and --compare need matplotlib: pip install 'lmserve[plot]'"
CHARTS = ("latency_cdf.png", "over_time.png", "throughput_vs_ttft_p99.png")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); PlotUnavailable when absent."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(series: list[Series], out_dir: Path, with_sweep: bool) -> list[Path]:
    """Writes the charts into `out_dir` (created); returns their paths. The throughput-against-p99-TTFT
    chart is drawn when `with_sweep` (a sweep, or runs compared)."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [(step_name(s, label, len(series)), record) for s in series for label, record in s.steps]
    written = [_latency_cdf(plt, steps, out_dir / CHARTS[0]), _over_time(plt, steps, out_dir / CHARTS[1])]
    if with_sweep:
        written.append(_sweep(plt, series, out_dir / CHARTS[2]))
    return written


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def _latency_cdf(plt: Any, steps: list[tuple[str, dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, record in steps:
        requests = [r for r in record.get("requests", []) if r["ok"]]
        ttft = [r["ttft_s"] * 1000 for r in requests if r["ttft_s"] is not None]
        e2e = [r["e2e_s"] * 1000 for r in requests]
        itl = [v * 1000 for v in record.get("itl_cdf_s", [])]
        itl_y = [i / (len(itl) - 1) for i in range(len(itl))] if len(itl) > 1 else [1.0] * len(itl)
        for ax, (xs, ys) in zip(axes, (_cdf(ttft), (itl, itl_y), _cdf(e2e))):
            if xs:
                ax.step(xs, ys, where="post", label=name)
    for ax, title in zip(axes, ("TTFT", "Inter-token latency", "End-to-end latency")):
        ax.set(title=title, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _over_time(plt: Any, steps: list[tuple[str, dict]], path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, record in steps:
        done = [r for r in record.get("requests", []) if r["ok"]]
        if not done:
            continue
        ends = [r["start_s"] + r["e2e_s"] for r in done]
        span = max(max(ends), 1e-3)
        num_bins = min(60, max(10, math.ceil(span)))
        width = span / num_bins
        tokens = [0.0] * num_bins
        for end, r in zip(ends, done):
            tokens[min(int(end / width), num_bins - 1)] += r["output_tokens"]
        top.plot([(i + 0.5) * width for i in range(num_bins)], [t / width for t in tokens], label=name)
        timed = [(r["start_s"], r["ttft_s"] * 1000) for r in done if r["ttft_s"] is not None]
        if timed:
            bottom.scatter(*zip(*timed), s=8, label=name)
    top.set(title="Output throughput over time (by completion)", ylabel="output tokens/s")
    bottom.set(title="TTFT of each request by its start", xlabel="seconds since the run started", ylabel="TTFT ms")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.lines or ax.collections:
            ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _sweep(plt: Any, series: list[Series], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for s in series:
        points = [(label, r) for label, r in s.steps if r.get("ttft_p99") is not None]
        for ax, key in zip(axes, ("request_throughput", "output_throughput")):
            xs = [r[key] for _, r in points]
            ys = [r["ttft_p99"] * 1000 for _, r in points]
            ax.plot(xs, ys, marker="o", label=s.label)
            for (label, _), x, y in zip(points, xs, ys):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    targets = {r["slo_ttft_ms"] for s in series for _, r in s.steps if r.get("slo_ttft_ms") is not None}
    for ax, unit in zip(axes, ("requests/s", "output tokens/s")):
        for target in sorted(targets):  # the line the p99 must stay under
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"TTFT SLO {target:g} ms")
        ax.set(title=f"p99 TTFT against throughput ({unit})", xlabel=unit, ylabel="TTFT p99 ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
