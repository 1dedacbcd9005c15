"""Running `lmserve bench` as a user does, for the tests of tests/bench/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import SERVED_MODEL_NAME


def bench(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lmserve bench ARGS` in a child process; its completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "lmserve.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def bench_json(url: str, out: Path, *args: str) -> dict[str, Any]:
    """A successful run against `url` (a server of the tiny model); its --json output."""
    proc = bench("--base-url", url + "/v1", "--model", SERVED_MODEL_NAME, "--vocab", "5:500", "--json", str(out),
                 *args)
    assert proc.returncode == 0, proc.stderr
    assert "latency ms" in proc.stdout and "TTFT" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def hand_percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation between the closest ranks, written out by hand
    (numpy's default, which the report uses)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
