"""Summaries of a run: throughput, latency percentiles and goodput under an SLO."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from lmserve.bench.client import RequestResult
from lmserve.bench.runner import RunResult

PERCENTILES = (50, 90, 95, 99)
"""The percentiles reported for TTFT, ITL and E2E (numpy's linear interpolation between samples)."""


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds; None leaves that one unchecked. A request meets the SLO when it
    succeeded and meets every target given: TTFT, the mean of its inter-token gaps (vLLM's TPOT; a
    request with a single chunk has none and meets it), and end-to-end latency."""

    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("ttft", self.ttft_s), ("itl", self.itl_s), ("e2e", self.e2e_s)):
            if value is not None and not value > 0:
                raise ValueError(f"--slo-{name}-ms must be > 0, got {value * 1000:g}")

    @property
    def is_set(self) -> bool:
        return any(value is not None for value in (self.ttft_s, self.itl_s, self.e2e_s))

    def is_met(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        if self.ttft_s is not None and (result.ttft is None or result.ttft > self.ttft_s):
            return False
        if self.itl_s is not None and result.inter_token and np.mean(result.inter_token) > self.itl_s:
            return False
        return self.e2e_s is None or result.latency <= self.e2e_s


@dataclass
class Summary:
    """One run's figures; latencies in seconds, None where there was no sample. Fields added after the
    first version have defaults, so that `Summary(**as_dict())` of an older JSON still loads."""

    num_requests: int
    num_ok: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_throughput: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    ttft_p90: float | None = None
    ttft_p95: float | None = None
    itl_p90: float | None = None
    itl_p95: float | None = None
    e2e_p90: float | None = None
    e2e_p95: float | None = None
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    slo_e2e_ms: float | None = None
    goodput_num_met: int | None = None
    """Requests that met every SLO given (None: no SLO given)."""
    goodput_fraction: float | None = None
    """goodput_num_met / num_requests (failed requests count as missed)."""
    goodput_request_throughput: float | None = None
    """goodput_num_met / duration_s: requests per second that met the SLO."""

    def as_dict(self) -> dict:
        return asdict(self)


def percentiles(values: list[float]) -> dict[int, float | None]:
    """{50: p50, 90: p90, 95: p95, 99: p99} of `values`; every one None when there are none."""
    if not values:
        return dict.fromkeys(PERCENTILES)
    points = np.percentile(values, PERCENTILES)
    return {q: float(v) for q, v in zip(PERCENTILES, points)}


def latency_samples(run: RunResult) -> dict[str, list[float]]:
    """TTFT, ITL (every gap of every request) and E2E samples of the successful requests, in seconds."""
    ok = [r for r in run.results if r.ok]
    return {"ttft": [r.ttft for r in ok if r.ttft is not None],
            "itl": [gap for r in ok for gap in r.inter_token],
            "e2e": [r.latency for r in ok]}


def summarize(run: RunResult, slo: Slo | None = None) -> Summary:
    ok = [r for r in run.results if r.ok]
    errors = Counter(str(r.status or r.error) for r in run.results if not r.ok)
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    d = run.duration
    samples = latency_samples(run)
    ttft, itl, e2e = (percentiles(samples[name]) for name in ("ttft", "itl", "e2e"))
    summary = Summary(
        num_requests=len(run.results), num_ok=len(ok), errors=dict(errors), duration_s=d,
        request_throughput=len(ok) / d, output_throughput=output / d, total_throughput=(output + prompt) / d,
        ttft_p50=ttft[50], ttft_p90=ttft[90], ttft_p95=ttft[95], ttft_p99=ttft[99],
        itl_p50=itl[50], itl_p90=itl[90], itl_p95=itl[95], itl_p99=itl[99],
        e2e_p50=e2e[50], e2e_p90=e2e[90], e2e_p95=e2e[95], e2e_p99=e2e[99],
    )
    if slo is not None and slo.is_set:
        met = sum(slo.is_met(r) for r in run.results)
        summary.slo_ttft_ms, summary.slo_itl_ms, summary.slo_e2e_ms = (
            None if s is None else s * 1000 for s in (slo.ttft_s, slo.itl_s, slo.e2e_s))
        summary.goodput_num_met = met
        summary.goodput_fraction = met / len(run.results) if run.results else 0.0
        summary.goodput_request_throughput = met / d
    return summary


def render(summary: Summary) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    rows = [
        ("requests", f"{summary.num_ok}/{summary.num_requests} ok" + (f", errors {summary.errors}" if summary.errors else "")),
        ("duration", f"{summary.duration_s:.2f} s"),
        ("throughput", f"{summary.request_throughput:.2f} req/s, {summary.output_throughput:.1f} output tok/s, "
                       f"{summary.total_throughput:.1f} total tok/s"),
    ]
    if summary.goodput_num_met is not None:
        rows.append(("goodput", _goodput_line(summary)))
    values = summary.as_dict()
    table = [("latency ms", [f"p{q}" for q in PERCENTILES])]
    table += [(label, [ms(values.get(f"{name}_p{q}")) for q in PERCENTILES])
              for name, label in (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E"))]
    width = max(len(name) for name, _ in rows + table)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"{name:<{width}}" + "".join(f"{cell:>9}" for cell in cells) for name, cells in table]
    return "\n".join(lines)


def _goodput_line(summary: Summary) -> str:
    targets = [f"{label} <= {value:g} ms" for label, value in
               (("TTFT", summary.slo_ttft_ms), ("ITL", summary.slo_itl_ms), ("E2E", summary.slo_e2e_ms))
               if value is not None]
    return (f"{summary.goodput_request_throughput:.2f} req/s, {summary.goodput_num_met}/{summary.num_requests} "
            f"({100 * (summary.goodput_fraction or 0):.1f}%) met {', '.join(targets)}")
