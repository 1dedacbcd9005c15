"""A `rich` progress bar on stderr while a run goes: only on a terminal, so that piped output, CI logs
and JSON on stdout (`--json -`) stay clean."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lmserve.bench.client import RequestResult


def is_wanted(quiet: bool) -> bool:
    """Progress is shown when stderr is a terminal and --quiet was not given."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress(total: int, title: str, enabled: bool) -> Iterator[Callable[[RequestResult], None]]:
    """Yields the callback that counts one finished request; the bar disappears when the block ends."""
    if not enabled:
        yield lambda result: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[num_failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(title, total=total, num_failed=0)
        num_failed = 0

        def advance(result: RequestResult) -> None:
            nonlocal num_failed
            num_failed += not result.ok
            bar.update(task, advance=1, num_failed=num_failed)

        yield advance
