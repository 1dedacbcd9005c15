"""`lmserve serve --quantization`: a quantized model served over HTTP, and bad values refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from openai import OpenAI

from lmserve import LLM, SamplingParams
from tests.server.conftest import MODEL_NAME
from tests.services import python_module

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"


def test_int8_server_answers_as_the_offline_int8_engine(start_server, tmp_path_factory):
    server = start_server("--quantization", "int8")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    offline = LLM(str(tmp_path_factory.getbasetemp() / "server-model"), quantization="int8", num_blocks=512)
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    assert reply.choices[0].text == expected.outputs[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert "with int8 quantization" in server.log() and "more KV blocks" in server.log()


@pytest.mark.parametrize(("args", "env"), [(["--quantization", "int3"], {}),
                                           ([], {"LMSERVE_QUANTIZATION": "int3"}),
                                           (["--quantization-group-size", "100"], {})])
def test_a_bad_quantization_is_one_line_and_exit_status_2(tmp_path, args, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    done = subprocess.run(python_module("lmserve.cli", "serve", "demo", *args), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path,
                          env={**clean, "PYTHONPATH": str(REPO_ROOT), "LMSERVE_HOME": str(tmp_path), **env})
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("lmserve serve: error: quantization"), line
