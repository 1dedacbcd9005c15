"""Building the CPU kernels: at install time, one build per kind of CPU, and none without a compiler.

The server tests give each server its own kernels directory (LMSERVE_KERNELS_DIR) and no compiler
(CXX=/nonexistent), so what they see does not depend on what an earlier run left in the cache.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from lmserve.engine import kernels
from tests.conftest import SERVED_MODEL_NAME
from tests.services import REPO_ROOT, Process

AVX2_CPU = frozenset("fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c hypervisor".split())
NO_COMPILER = {"CXX": "/nonexistent/c++"}
FALLBACK = "using the PyTorch attention backend"

# Picks the attention backend as a server does, optionally as if on a CPU with the flags argv[1].
PICK_BACKEND = """
import logging, sys
import torch
from lmserve.engine import kernels
from lmserve.engine.attention import make_backend
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
if len(sys.argv) > 1:
    kernels.cpu_flags = lambda: frozenset(sys.argv[1].split())
print("backend:", type(make_backend("auto", torch.device("cpu"), 16)).__name__)
"""


def run_python(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def complete(server: Process) -> str:
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(model=SERVED_MODEL_NAME, prompt="hello", max_tokens=3)
    return answer.choices[0].finish_reason


def test_cpu_flags_come_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert kernels.cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # Arm
    assert kernels.cpu_flags(info) == {"fp", "asimd", "bf16"}
    assert kernels.cpu_flags(tmp_path / "missing") == frozenset()


def test_the_cpu_key_changes_with_the_instruction_sets_a_build_uses():
    key = kernels.cpu_key(AVX2_CPU, "x86_64")
    assert kernels.cpu_key(AVX2_CPU | {"avx512f"}, "x86_64") != key
    assert kernels.cpu_key(AVX2_CPU | {"avx512_bf16"}, "x86_64") != key
    assert kernels.cpu_key(AVX2_CPU - {"fma"}, "x86_64") != key
    assert kernels.cpu_key(AVX2_CPU, "aarch64") != key
    # Flags no build uses (a hypervisor's, timers') do not split a shared cache.
    assert kernels.cpu_key((AVX2_CPU - {"hypervisor"}) | {"constant_tsc"}, "x86_64") == key


def test_a_build_targets_exactly_its_cpus_instruction_sets(monkeypatch):
    avx2 = kernels.current_build(AVX2_CPU)
    assert "-march=native" not in avx2.cflags
    assert {"-mavx2", "-mfma"} <= set(avx2.cflags) and "-mavx512f" not in avx2.cflags
    avx512 = kernels.current_build(AVX2_CPU | {"avx512f", "avx512bw"})
    assert {"-mavx512f", "-mavx512bw"} <= set(avx512.cflags)
    assert avx512.name != avx2.name and avx512.directory != avx2.directory
    monkeypatch.setenv("LMSERVE_KERNELS_DIR", "/opt/kernels")
    assert kernels.current_build(AVX2_CPU).directory == Path("/opt/kernels") / avx2.name
    monkeypatch.delenv("LMSERVE_KERNELS_DIR")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/cache")
    assert kernels.current_build(AVX2_CPU).directory == Path("/cache/lmserve") / avx2.name


def test_without_a_compiler_a_server_falls_back_with_one_log_line(start_server, tmp_path):
    server = start_server(env={**NO_COMPILER, "LMSERVE_KERNELS_DIR": str(tmp_path)})
    warnings = [e for e in server.log_entries() if FALLBACK in e.get("msg", "")]
    assert len(warnings) == 1, server.log()[-3000:]
    assert "no C++ compiler" in warnings[0]["msg"] and str(tmp_path) in warnings[0]["msg"]
    assert complete(server) == "length"
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A kernels directory holding the install step's build. `make install` (which `make test`
    and CI run first) has made it: it is copied, so that the tests may clean their copy, instead of
    compiled again (~4 minutes on 2 cores). Built here, as the install step does, where no
    install step ran."""
    directory = tmp_path_factory.mktemp("kernels")
    made = kernels.current_build()
    if made.complete:
        shutil.copytree(made.directory, directory / made.name)
        return directory
    done = run_python(["-m", "lmserve.engine.kernels", "build"], {"LMSERVE_KERNELS_DIR": str(directory)},
                      timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ready in" in done.stdout
    return directory


@pytest.mark.slow
def test_a_server_loads_the_install_steps_build_without_compiling(installed, start_server):
    server = start_server(env={**NO_COMPILER, "LMSERVE_KERNELS_DIR": str(installed)})
    log = server.log()
    assert "CPU kernels: loaded" in log and "building" not in log and FALLBACK not in log, log[-3000:]
    assert complete(server) == "length"
    again = run_python(["-m", "lmserve.engine.kernels", "build"],
                       {**NO_COMPILER, "LMSERVE_KERNELS_DIR": str(installed)})
    assert again.returncode == 0 and "building" not in again.stderr  # built once, then only loaded


@pytest.mark.slow
def test_another_cpus_build_is_not_loaded(installed):
    env = {**NO_COMPILER, "LMSERVE_KERNELS_DIR": str(installed)}
    here = run_python(["-c", PICK_BACKEND], env)
    assert "backend: CPUAttentionBackend" in here.stdout, here.stderr[-3000:]
    # The same cache seen from a CPU with(out) AVX-512, with(out) AVX2: that CPU's build is missing,
    # and with no compiler to build it the PyTorch path runs rather than this CPU's build.
    for flags in [kernels.cpu_flags() ^ {"avx512f"}, kernels.cpu_flags() ^ {"avx2"}]:
        other = run_python(["-c", PICK_BACKEND, " ".join(sorted(flags))], env)
        assert "backend: TorchAttentionBackend" in other.stdout, other.stderr[-3000:]
        assert other.stderr.count(FALLBACK) == 1 and "no C++ compiler" in other.stderr


@pytest.mark.slow
def test_clean_removes_every_build(installed):
    assert list(installed.glob("lmserve_kernels_*"))
    done = run_python(["-m", "lmserve.engine.kernels", "clean"], {"LMSERVE_KERNELS_DIR": str(installed)})
    assert done.returncode == 0, done.stderr
    assert not list(installed.glob("lmserve_kernels_*"))
