"""Bad `lmserve bench` flags: one line on stderr naming the problem, exit 2, nothing sent."""

import pytest

from tests.bench.helpers import bench

UNREACHABLE = ("--base-url", "http://127.0.0.1:9/v1")


@pytest.mark.parametrize("args, message", [
    (("--model", "m", "--concurrency", "0"), "--concurrency: every value must be > 0, got '0'"),
    (("--model", "m", "--concurrency", "1,x"), "--concurrency: expected a comma list of numbers like 1,2,4, got '1,x'"),
    (("--model", "m", "--rates", "1,-2"), "--rates: every value must be > 0, got '1,-2'"),
    (("--model", "m", "--rates", "1,2", "--rate", "3"), "give --rate (one run) or --rates (a sweep), not both"),
    (("--model", "m", "--rates", "1,2", "--concurrency", "1,2"),
     "sweep one thing at a time: --rates with one --concurrency, or a --concurrency list"),
    (("--model", "m", "--slo-ttft-ms", "0"), "--slo-ttft-ms must be > 0, got 0"),
    (("--model", "m", "--slo-ttft-ms", "100", "--no-stream"), "--slo-ttft-ms needs streaming (drop --no-stream)"),
    (("--model", "m", "--num-requests", "0"), "--num-requests must be >= 1, got 0"),
    (("--model", "m", "--dataset", "/nonexistent/d.jsonl"), "No such file"),
    (("--num-requests", "3"), "--model is required"),
    (("--model", "m", "extra.json"), "unexpected argument 'extra.json' (files are read only with --compare)"),
    (("--compare",), "--compare needs the --json files of earlier runs: --compare A.json B.json"),
    (("--compare", "/nonexistent/a.json"), "cannot read /nonexistent/a.json: No such file or directory"),
    (("--model", "m", "--json", "/nonexistent/out.json"), "--json /nonexistent/out.json: no directory /nonexistent"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message):
    proc = bench(*UNREACHABLE, *args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmserve bench: error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_plot_into_a_file_is_refused_before_the_run(tmp_path):
    taken = tmp_path / "charts"
    taken.write_text("a file where the charts would go")
    proc = bench(*UNREACHABLE, "--model", "m", "--plot", str(taken), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"lmserve bench: error: --plot {taken}: not a directory"
