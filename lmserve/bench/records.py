"""A run as JSON (what `--json` writes and `--compare` reads back) and the series the charts draw.

A single run's JSON holds the Summary's keys at the top level (what CI and benchmarks/ read), `load`
(how it was driven), `requests` (one entry per request, on the run's clock) and `itl_cdf_s`. A sweep's
JSON is {"sweep": {"axis", "values"}, "steps": [one single-run JSON per value]}."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmserve.bench.report import Summary, latency_samples
from lmserve.bench.runner import RunResult

CDF_POINTS = 101
"""ITL is kept as its values at percentiles 0, 1, ..., 100: every gap of every request would make
the JSON grow with requests x output tokens."""


@dataclass
class Series:
    """One run or one sweep from one source, for the charts: `steps` are (label, run JSON) in the
    order they ran; a single run has one step."""

    label: str
    steps: list[tuple[str, dict[str, Any]]]


def run_record(run: RunResult, summary: Summary, load: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one run: the summary's keys, `load`, `requests` and `itl_cdf_s` (seconds)."""
    itl = latency_samples(run)["itl"]
    requests = [{
        "start_s": round(r.started - run.started, 6),
        "ok": r.ok,
        "status": r.status,
        "ttft_s": None if r.ttft is None else round(r.ttft, 6),
        "e2e_s": round(r.latency, 6),
        "itl_mean_s": round(float(np.mean(r.inter_token)), 6) if r.inter_token else None,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
    } for r in run.results]
    cdf = np.percentile(itl, np.linspace(0, 100, CDF_POINTS)).round(6).tolist() if itl else []
    return {**summary.as_dict(), "load": load, "requests": requests, "itl_cdf_s": cdf}


def sweep_record(axis: str, values: Sequence[float], steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"sweep": {"axis": axis, "values": values}, "steps": steps}


def step_label(load: dict[str, Any]) -> str:
    """'rate 2/s, c 64' style label of how a step was driven ('run' for JSON without `load`)."""
    if not load:
        return "run"
    rate = load.get("rate")
    concurrency = load.get("concurrency")
    if rate is None:
        return f"c {concurrency}"
    return f"rate {rate:g}/s" + ("" if concurrency is None else f", c {concurrency}")


def step_name(series: Series, step: str, num_series: int) -> str:
    """How a step is named on a chart or in a table beside `num_series` series in all."""
    if num_series == 1:
        return step
    return series.label if len(series.steps) == 1 else f"{series.label}: {step}"


def series_of(label: str, record: dict[str, Any]) -> Series:
    """A run or sweep JSON as a Series."""
    if "steps" in record:
        return Series(label, [(step_label(step.get("load", {})), step) for step in record["steps"]])
    return Series(label, [(step_label(record.get("load", {})), record)])


def load_series(path: Path) -> Series:
    """Reads an earlier `lmserve bench --json` file; ValueError naming the file if it is not one."""
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"{path} is not JSON") from None
    runs = record.get("steps") if isinstance(record, dict) else None
    if runs is None and isinstance(record, dict):
        runs = [record]
    if not runs or not all(isinstance(r, dict) and "ttft_p99" in r and "request_throughput" in r for r in runs):
        raise ValueError(f"{path} is not the JSON of `lmserve bench --json`")
    return series_of(path.stem, record)
