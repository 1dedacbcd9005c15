"""`lmserve bench --plot`, sweeps and `--compare` against a real server: the charts are PNG files
that matplotlib reads back, and the sweep JSON has one entry per step."""

import json
import os

import matplotlib.image
import pytest

from tests.bench.helpers import bench, bench_json
from tests.conftest import SERVED_MODEL_NAME

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ("--num-requests", "8", "--input-len", "5:20", "--output-len", "4:8")


def assert_png(path, min_width=300):
    """A real PNG: the signature, and an image of plausible size that matplotlib decodes."""
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[0] >= 200
    assert image.std() > 0  # not a blank canvas


def test_plot_of_one_run(server, tmp_path):
    charts = tmp_path / "charts"
    summary = bench_json(server.url, tmp_path / "run.json", *SMALL, "--concurrency", "4", "--plot", str(charts))
    assert summary["num_ok"] == 8
    assert sorted(p.name for p in charts.iterdir()) == ["latency_cdf.png", "over_time.png"]
    for path in charts.iterdir():
        assert_png(path)


def test_concurrency_sweep_then_compare(server, tmp_path):
    charts = tmp_path / "sweep"
    sweep = bench_json(server.url, tmp_path / "sweep.json", *SMALL, "--concurrency", "1,4", "--plot", str(charts))
    assert sweep["sweep"] == {"axis": "concurrency", "values": [1, 4]}
    assert [step["load"]["concurrency"] for step in sweep["steps"]] == [1, 4]
    assert all(step["num_ok"] == 8 and step["ttft_p99"] > 0 for step in sweep["steps"])
    assert sorted(p.name for p in charts.iterdir()) == ["latency_cdf.png", "over_time.png",
                                                        "throughput_vs_ttft_p99.png"]
    for path in charts.iterdir():
        assert_png(path)

    single = bench_json(server.url, tmp_path / "single.json", *SMALL, "--concurrency", "2")
    compared = tmp_path / "compared"
    proc = bench("--compare", str(tmp_path / "sweep.json"), str(tmp_path / "single.json"), "--plot", str(compared))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "ok", "req/s"]
    assert [line.split()[0] for line in lines[1:4]] == ["sweep:", "sweep:", "single"]
    assert f"{single['request_throughput']:.2f}" in lines[3]
    assert "charts: " in proc.stdout
    for name in ("latency_cdf.png", "over_time.png", "throughput_vs_ttft_p99.png"):
        assert_png(compared / name)


def test_rate_sweep_json_has_a_step_per_rate(server, tmp_path):
    sweep = bench_json(server.url, tmp_path / "rates.json", "--num-requests", "4", "--input-len", "5",
                       "--output-len", "3", "--rates", "20,40", "--concurrency", "3")
    assert sweep["sweep"]["axis"] == "rate"
    assert [(s["load"]["rate"], s["load"]["concurrency"], s["num_ok"]) for s in sweep["steps"]] == \
        [(20.0, 3, 4), (40.0, 3, 4)]


def test_compare_reads_older_json_without_per_request_data(tmp_path):
    # A summary written before per-request records existed still draws on the sweep chart.
    old = {"num_requests": 4, "num_ok": 4, "errors": {}, "duration_s": 1.0, "request_throughput": 4.0,
           "output_throughput": 40.0, "total_throughput": 80.0, "ttft_p50": 0.01, "ttft_p99": 0.02,
           "itl_p50": 0.001, "itl_p99": 0.002, "e2e_p50": 0.1, "e2e_p99": 0.2}
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps({**old, "request_throughput": 8.0, "ttft_p99": 0.05}))
    proc = bench("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--plot", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "c" / "throughput_vs_ttft_p99.png")
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:3]] == ["a", "b"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"hello": 1}', "is not the JSON of `lmserve bench --json`"),
])
def test_compare_refuses_other_files(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content)
    proc = bench("--compare", str(tmp_path / "x.json"), "--plot", str(tmp_path / "c"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_plot_without_matplotlib_is_one_line_and_sends_nothing(tmp_path):
    # A `matplotlib` that cannot be imported, first on the path: as on an install without the extra.
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (("--model", SERVED_MODEL_NAME, "--base-url", "http://127.0.0.1:9/v1", "--plot", str(tmp_path / "p")),
                 ("--compare", str(tmp_path / "a.json"))):
        proc = bench(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == ("lmserve bench: error: --plot and --compare need matplotlib: "
                                       "pip install 'lmserve[plot]'")
