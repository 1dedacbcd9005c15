"""`lmserve batch run INPUT.jsonl -o OUTPUT.jsonl --model DIR`: an OpenAI batch file, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

batch_app = typer.Typer(help="Run OpenAI batch files (JSONL) offline against a model, without a server.",
                        no_args_is_help=True)


def _fail(message: str) -> None:
    print(f"lmserve batch run: error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@batch_app.command("run")
def run(
    input_path: Path = typer.Argument(..., metavar="INPUT.jsonl", help="Batch input file (OpenAI's format)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the output file (OpenAI's format)."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory, Hugging Face Hub id, or 'demo'."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Sequences the engine runs at once."),
) -> None:
    """Run every request of INPUT through the engine; write one output line per request, in input order.

    Each line is checked before the model runs; a bad one is named on stderr, with exit status 2.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmserve.batch.jsonl import BatchInputError, parse_input
    from lmserve.batch.offline import URLS, run_file

    if not input_path.is_file():
        _fail(f"{input_path}: no such file")
    try:
        parse_input(input_path.read_bytes(), URLS)  # the format first: no model load for a malformed file
    except BatchInputError as exc:
        _fail(f"{input_path}: {exc}")
    from lmserve.engine.llm import LLM

    try:
        llm = LLM(model, **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}))
    except (ValueError, OSError) as exc:
        _fail(f"cannot load model {model!r}: {exc}")
    columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("batch", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            count = run_file(input_path, output, llm, on_progress)
        except BatchInputError as exc:
            output.unlink(missing_ok=True)
            _fail(f"{input_path}: {exc}")
    print(f"{count} requests -> {output}", file=sys.stderr)
