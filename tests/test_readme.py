"""The README's tour runs as written: every ```bash runnable``` block, in order, against a real
default stack (`lmserve up`) on free ports with its own home, exits 0 and prints what the README
says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import REPO_ROOT, StackProcess, start_stack

RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```$", re.DOTALL | re.MULTILINE)
# What the tour names, and what stands for it in a test stack.
README_PORT, README_SERVER_PORTS, README_HOME = 8000, (8100, 8101), "~/.lmserve"


def runnable_blocks(text: str) -> list[str]:
    return RUNNABLE.findall(text)


def localize(block: str, stack: StackProcess) -> str:
    """The block with the test stack's ports and home in place of the README's."""
    ports = {README_PORT: stack.port, **{p: stack.server_port(i) for i, p in enumerate(README_SERVER_PORTS)}}
    block = re.sub(r"(?<![\d.])(8000|8100|8101)(?!\d)", lambda m: str(ports[int(m.group(1))]), block)
    return block.replace(README_HOME, str(stack.home))


def test_blocks_are_found_and_localized(tmp_path):
    text = "x\n```bash runnable\ncurl localhost:8000/v1 http://127.0.0.1:8101/ready -c ~/.lmserve/g.yaml\n```\n" \
           "```bash\nnot runnable\n```\n"
    stack = StackProcess(popen=None, port=40000, home=tmp_path, log_path=tmp_path / "log")  # type: ignore[arg-type]
    [block] = runnable_blocks(text)
    assert localize(block, stack) == f"curl localhost:40000/v1 http://127.0.0.1:40101/ready -c {tmp_path}/g.yaml\n"


def run_block(block: str, stack: StackProcess, tmp_path: Path, index: int) -> str:
    """Runs the block from a file (so that `pkill -f` in it cannot match the shell running it),
    with -e and pipefail: any failing command fails the block."""
    script = tmp_path / f"block{index}.sh"
    script.write_text(localize(block, stack))
    env = {**os.environ, "LMSERVE_KEY": stack.api_key, "LMSERVE_HOME": str(stack.home), "PYTHONPATH": str(REPO_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", str(script)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README block {index} failed ({done.returncode}):\n{block}\n{output[-3000:]}"
    assert done.stdout.strip(), f"README block {index} printed nothing:\n{block}"
    return done.stdout


@pytest.fixture
def stack(tmp_path):
    stack = start_stack(tmp_path)
    yield stack
    stack.stop(10)


def kind_of(block: str) -> str:
    """Which step of the tour a block is, from what it runs."""
    for marker, kind in (("--rpm 2", "rate limit"), ("pkill", "kill"), ("until curl", "back"), ("OpenAI(", "sdk"),
                         ("lmserve bench", "bench"), ("/metrics", "metrics"), ('"stream": true', "stream")):
        if marker in block:
            return kind
    return "chat"


def check_output(kind: str, out: str, stack: StackProcess) -> None:
    """What the README says each step prints (model text itself varies from run to run)."""
    if kind == "rate limit":
        assert out.split()[:3] == ["200", "200", "429"], out
        assert "HTTP/1.1 429" in out and "retry-after:" in out.lower() and "rate_limit_exceeded" in out
        return
    assert '"error"' not in out, out
    if kind == "kill":
        assert out.split()[:6] == ["200"] * 6, out
        assert '"models":{"lmserve-demo":1}' in out, out
        stack.wait_for(r"lmserve-demo-0 exited \(code -9\)", 10)
    elif kind == "back":
        assert '"models":{"lmserve-demo":2}' in out, out
        stack.wait_for(r"lmserve-demo-0 restarted", 1)
    elif kind == "stream":
        assert out.rstrip().endswith("data: [DONE]") and '"delta":{"content":' in out, out
    elif kind == "bench":
        assert re.search(r"requests\s+(\d+)/\1 ok", out), out
    elif kind == "sdk":
        assert re.search(r"\d+ prompt tokens, \d+ completion tokens", out), out
    elif kind == "metrics":
        assert "lmserve_gateway_requests_total{" in out and "lmserve:generation_tokens_total{" in out, out
    else:
        assert '"content":' in out, out


def test_the_tour_runs_as_written(stack, tmp_path):
    blocks = runnable_blocks((REPO_ROOT / "README.md").read_text())
    kinds = [kind_of(block) for block in blocks]
    assert kinds == ["chat", "stream", "sdk", "metrics", "bench", "rate limit", "kill", "back"], kinds
    for index, (block, kind) in enumerate(zip(blocks, kinds)):
        check_output(kind, run_block(block, stack, tmp_path, index), stack)
