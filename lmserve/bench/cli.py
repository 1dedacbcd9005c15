"""`lmserve bench`: measure any OpenAI-compatible endpoint the way users feel it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer

from lmserve.bench import plots
from lmserve.bench.client import Target
from lmserve.bench.progress import is_wanted, progress
from lmserve.bench.records import Series, load_series, run_record, series_of, step_name, sweep_record
from lmserve.bench.report import Slo, render, summarize
from lmserve.bench.runner import LoadShape, run
from lmserve.bench.workload import RequestSpec, from_dataset, parse_list, parse_range, random_token_ids

DEFAULT_NUM_REQUESTS = 100


@dataclass
class Plan:
    """The load steps of one invocation: one, or one per value of a sweep (all with the same
    workload). Built and checked before any request is sent."""

    steps: list[LoadShape]
    sweep_axis: str | None
    """"rate" or "concurrency" for a sweep; None for a single run."""
    values: Sequence[float]
    """The swept value of each step (empty for a single run)."""
    slo: Slo


def bench_command(
    files: list[Path] = typer.Argument(None, show_default=False, metavar="FILES",
                                       help="With --compare: earlier --json files to draw on one set of charts."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", help="The endpoint's /v1 URL."),
    model: str | None = typer.Option(None, help="Model name to send (required unless --compare)."),
    api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="Bearer key, if the endpoint needs one."),
    num_requests: int | None = typer.Option(
        None, help=f"How many requests to send (default {DEFAULT_NUM_REQUESTS}; with --dataset, every entry; "
                   "more than the dataset holds reads it again from the top)."),
    input_len: str = typer.Option("64:512", help="Prompt length in tokens: N or LOW:HIGH."),
    output_len: str = typer.Option("32:256", help="Output length in tokens: N or LOW:HIGH (ShareGPT answers "
                                                   "are clipped into it; JSONL lines without max_tokens use HIGH)."),
    vocab: str = typer.Option("100:31900", help="Range of random prompt token ids."),
    dataset: Path | None = typer.Option(
        None, help="Prompts from a file instead of random ones: JSONL of {prompt | messages, max_tokens}, "
                   "or a ShareGPT .json (first human turn as prompt)."),
    concurrency: str = typer.Option("64", help="Most requests in flight: N, or a comma list (1,8,32) to sweep."),
    rate: float | None = typer.Option(None, help="Poisson arrival rate in req/s (default: as fast as possible)."),
    rates: str | None = typer.Option(None, help="Sweep Poisson arrival rates: a comma list of req/s (1,2,4,8)."),
    seed: int = typer.Option(0, help="Seed of prompts and arrivals."),
    stream: bool = typer.Option(True, help="Stream, to measure time to first token."),
    slo_ttft_ms: float | None = typer.Option(None, help="Goodput: time-to-first-token target in ms."),
    slo_itl_ms: float | None = typer.Option(None, help="Goodput: target of a request's mean inter-token gap in ms."),
    slo_e2e_ms: float | None = typer.Option(None, help="Goodput: end-to-end latency target in ms."),
    plot: Path | None = typer.Option(None, help="Write PNG charts into this directory (needs matplotlib)."),
    compare: bool = typer.Option(False, "--compare", help="Send nothing: draw FILES (earlier --json outputs) on one set of "
                                             "charts (into --plot DIR, default the current directory)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (it is shown only on a terminal)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON here ('-': stdout, "
                                                              "and the text report goes to stderr)."),
) -> None:
    """Send a workload to an OpenAI-compatible endpoint; print throughput, goodput and TTFT / ITL / E2E
    percentiles; optionally sweep load levels and draw charts."""
    to_stdout = json_out is not None and str(json_out) == "-"
    report = sys.stderr if to_stdout else sys.stdout
    try:
        _check_outputs(json_out, plot, to_stdout)
        if plot is not None or compare:
            plots.pyplot()
        if compare:
            if not files:
                raise ValueError("--compare needs the --json files of earlier runs: --compare A.json B.json")
            _compare([load_series(path) for path in files], plot or Path("."), report)
            return
        if files:
            raise ValueError(f"unexpected argument {str(files[0])!r} (files are read only with --compare)")
        if model is None:
            raise ValueError("--model is required")
        slo = Slo(*(None if ms is None else ms / 1000 for ms in (slo_ttft_ms, slo_itl_ms, slo_e2e_ms)))
        plan = _plan(concurrency, rate, rates, seed, slo)
        if plan.slo.ttft_s is not None and not stream:
            raise ValueError("--slo-ttft-ms needs streaming (drop --no-stream)")
        specs = _workload(dataset, num_requests, input_len, output_len, vocab, seed)
        target = Target(base_url=base_url, model=model, api_key=api_key, stream=stream)
    except (ValueError, plots.PlotUnavailable) as exc:
        _fail(str(exc))
    record, num_failed_steps = _run_plan(target, specs, plan, is_wanted(quiet), report)
    if json_out is not None:
        text = json.dumps(record, indent=2)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            json_out.write_text(text)
    if plot is not None:
        series = series_of("run", record)
        _print_written(plots.draw([series], plot, with_sweep=plan.sweep_axis is not None), report)
    if num_failed_steps:
        raise typer.Exit(1)


def _fail(message: str) -> NoReturn:
    typer.echo(f"lmserve bench: error: {message}", err=True)
    raise typer.Exit(2)


def _check_outputs(json_out: Path | None, plot: Path | None, to_stdout: bool) -> None:
    """Fails before the run, not after it, when its results could not be written."""
    if json_out is not None and not to_stdout and not json_out.parent.is_dir():
        raise ValueError(f"--json {json_out}: no directory {json_out.parent}")
    if plot is not None and plot.exists() and not plot.is_dir():
        raise ValueError(f"--plot {plot}: not a directory")


def _plan(concurrency: str, rate: float | None, rates: str | None, seed: int, slo: Slo) -> Plan:
    """The load steps of the flags: one run, or a sweep over --rates or a --concurrency list."""
    levels = parse_list(concurrency, int, "--concurrency")
    if rates is not None and rate is not None:
        raise ValueError("give --rate (one run) or --rates (a sweep), not both")
    if rates is not None and len(levels) > 1:
        raise ValueError("sweep one thing at a time: --rates with one --concurrency, or a --concurrency list")
    if rates is not None:
        values = parse_list(rates, float, "--rates")
        return Plan([LoadShape(levels[0], r, seed) for r in values], "rate", values, slo)
    steps = [LoadShape(c, rate, seed) for c in levels]
    if len(levels) == 1:
        return Plan(steps, None, [], slo)
    return Plan(steps, "concurrency", levels, slo)


def _workload(dataset: Path | None, num_requests: int | None, input_len: str, output_len: str, vocab: str,
              seed: int) -> list[RequestSpec]:
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if dataset is not None:
        return from_dataset(dataset, num_requests, parse_range(output_len))
    return random_token_ids(num_requests or DEFAULT_NUM_REQUESTS, parse_range(input_len), parse_range(output_len),
                            parse_range(vocab), seed)


def _run_plan(target: Target, specs: list[RequestSpec], plan: Plan, show_progress: bool,
              report: TextIO) -> tuple[dict[str, Any], int]:
    """Runs every step of the plan; returns the JSON record and how many steps had no success."""
    records = []
    for shape in plan.steps:
        load = {"concurrency": shape.concurrency, "rate": shape.rate, "num_requests": len(specs)}
        title = "bench" if plan.sweep_axis is None else f"rate {shape.rate:g}/s" if plan.sweep_axis == "rate" \
            else f"concurrency {shape.concurrency}"
        with progress(len(specs), title, show_progress) as advance:
            result = asyncio.run(run(target, specs, shape, on_done=advance))
        summary = summarize(result, plan.slo)
        if plan.sweep_axis is not None:
            print(f"== {title}", file=report)
        print(render(summary), file=report, flush=True)
        records.append(run_record(result, summary, load))
    num_failed = sum(r["num_ok"] == 0 for r in records)
    if plan.sweep_axis is None:
        return records[0], num_failed
    record = sweep_record(plan.sweep_axis, plan.values, records)
    print(render_table([series_of("sweep", record)]), file=report)
    return record, num_failed


def _compare(series: list[Series], out_dir: Path, report: TextIO) -> None:
    print(render_table(series), file=report)
    _print_written(plots.draw(series, out_dir, with_sweep=True), report)


def _print_written(paths: list[Path], report: TextIO) -> None:
    print("charts: " + ", ".join(str(p) for p in paths), file=report)


def render_table(series: list[Series]) -> str:
    """One line per run or sweep step: throughput, TTFT p50/p99 and goodput where measured."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    header = ("run", "ok", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "goodput")
    rows = [header]
    for s in series:
        for label, r in s.steps:
            name = step_name(s, label, len(series))
            goodput = r.get("goodput_request_throughput")
            rows.append((name, f"{r['num_ok']}/{r['num_requests']}", f"{r['request_throughput']:.2f}",
                         f"{r['output_throughput']:.1f}", ms(r.get("ttft_p50")), ms(r.get("ttft_p99")),
                         "-" if goodput is None else f"{goodput:.2f} req/s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                               in enumerate(zip(row, widths))) for row in rows)
