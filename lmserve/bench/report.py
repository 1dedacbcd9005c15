"""Summaries of a run: throughput and latency percentiles."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from lmserve.bench.runner import RunResult


@dataclass
class Summary:
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

    def as_dict(self) -> dict:
        return asdict(self)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(run: RunResult) -> Summary:
    ok = [r for r in run.results if r.ok]
    errors = Counter(str(r.status or r.error) for r in run.results if not r.ok)
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [gap for r in ok for gap in r.inter_token]
    e2e = [r.latency for r in ok]
    d = run.duration
    return Summary(
        num_requests=len(run.results), num_ok=len(ok), errors=dict(errors), duration_s=d,
        request_throughput=len(ok) / d, output_throughput=output / d, total_throughput=(output + prompt) / d,
        ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99), itl_p50=_pct(itl, 50), itl_p99=_pct(itl, 99),
        e2e_p50=_pct(e2e, 50), e2e_p99=_pct(e2e, 99),
    )


def render(summary: Summary) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    rows = [
        ("requests", f"{summary.num_ok}/{summary.num_requests} ok" + (f", errors {summary.errors}" if summary.errors else "")),
        ("duration", f"{summary.duration_s:.2f} s"),
        ("throughput", f"{summary.request_throughput:.2f} req/s, {summary.output_throughput:.1f} output tok/s, "
                       f"{summary.total_throughput:.1f} total tok/s"),
        ("TTFT p50 / p99", f"{ms(summary.ttft_p50)} / {ms(summary.ttft_p99)}"),
        ("ITL p50 / p99", f"{ms(summary.itl_p50)} / {ms(summary.itl_p99)}"),
        ("E2E p50 / p99", f"{ms(summary.e2e_p50)} / {ms(summary.e2e_p99)}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
