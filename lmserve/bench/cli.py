"""`lmserve bench`: measure any OpenAI-compatible endpoint the way users feel it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from lmserve.bench.client import Target
from lmserve.bench.report import render, summarize
from lmserve.bench.runner import LoadShape, run
from lmserve.bench.workload import from_jsonl, parse_range, random_token_ids


def bench_command(
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", help="The endpoint's /v1 URL."),
    model: str = typer.Option(..., help="Model name to send."),
    api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="Bearer key, if the endpoint needs one."),
    num_requests: int = typer.Option(100, min=1, help="How many requests to send."),
    input_len: str = typer.Option("64:512", help="Prompt length in tokens: N or LOW:HIGH."),
    output_len: str = typer.Option("32:256", help="Output length in tokens: N or LOW:HIGH."),
    vocab: str = typer.Option("100:31900", help="Range of random prompt token ids."),
    dataset: Path | None = typer.Option(None, help="JSONL of {prompt, max_tokens} instead of random prompts."),
    concurrency: int = typer.Option(64, min=1, help="Most requests in flight."),
    rate: float | None = typer.Option(None, help="Poisson arrival rate in req/s (default: as fast as possible)."),
    seed: int = typer.Option(0, help="Seed of prompts and arrivals."),
    stream: bool = typer.Option(True, help="Stream, to measure time to first token."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Send a workload to an OpenAI-compatible endpoint; print throughput and TTFT / ITL / E2E percentiles."""
    try:
        if dataset is not None:
            specs = from_jsonl(dataset, parse_range(output_len)[1])
        else:
            specs = random_token_ids(num_requests, parse_range(input_len), parse_range(output_len),
                                     parse_range(vocab), seed)
        shape = LoadShape(concurrency=concurrency, rate=rate, seed=seed)
    except ValueError as exc:
        typer.echo(f"lmserve bench: error: {exc}", err=True)
        raise typer.Exit(2) from None
    target = Target(base_url=base_url, model=model, api_key=api_key, stream=stream)
    summary = summarize(asyncio.run(run(target, specs, shape)))
    typer.echo(render(summary))
    if json_out is not None:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))
    if summary.num_ok == 0:
        raise typer.Exit(1)
