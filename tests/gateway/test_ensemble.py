"""Ensemble routes (issue 17): one model name answered by several models, by the first complete
answer (hedging) or the highest mean log-probability; every member is charged to the key."""

from __future__ import annotations

import concurrent.futures
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lmserve.gateway.config import config_from_dict
from tests.gateway.conftest import base_config
from tests.services import Process, free_port, python_module, start_process
from tests.tiny_models import build_model

MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox"}]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    """Two `lmserve serve` processes on tiny Llamas with different random weights."""

    models = {}
    for seed in (1, 2):  # one at a time: transformers' lazy imports are not thread-safe
        models[seed] = tmp_path_factory.mktemp(f"ensemble-model-{seed}")
        build_model("llama3", models[seed], seed=seed)

    started: dict[int, Process] = {}  # each one is stopped at the end, even if the other failed to start

    def start(seed: int) -> None:
        port = free_port()
        args = python_module("lmserve.cli", "serve", str(models[seed]), "--port", str(port), "--served-model-name",
                             "tiny", "--num-blocks", "256")
        started[seed] = start_process(args, port, tmp_path_factory.mktemp(f"serve-{seed}") / "server.log",
                                      ready_path="/ready", timeout=120)

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(start, [1, 2]))
        yield [started[1], started[2]]
    finally:
        for server in started.values():
            server.stop()


def ensemble_config(tmp_path: Path, a: str, b: str, rule: str) -> dict[str, Any]:
    models = [{"name": "m1", "upstream_model": "tiny", "backends": [{"url": a}]},
              {"name": "m2", "upstream_model": "tiny", "backends": [{"url": b}]}]
    return base_config(tmp_path, models, ensembles=[{"name": "both", "members": ["m1", "m2"], "rule": rule}])


def mean_logprob(server: Process, max_tokens: int) -> tuple[float, str, int, int]:
    """The member's own greedy answer straight from its server: mean logprob, text and usage."""
    reply = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=max_tokens, temperature=0, logprobs=True)
    values = [t.logprob for t in reply.choices[0].logprobs.content]
    return (sum(values) / len(values), reply.choices[0].message.content or "", reply.usage.prompt_tokens,
            reply.usage.completion_tokens)


def wait_usage(gw: Any, key_id: str, requests: int) -> dict[str, dict[str, int]]:
    deadline = time.monotonic() + 10
    while True:
        rows = gw.admin("GET", "/admin/usage", params={"key_id": key_id}).json()["data"]
        if sum(r["requests"] for r in rows) >= requests or time.monotonic() > deadline:
            return {r["model"]: r for r in rows}
        time.sleep(0.1)


def test_logprob_rule_answers_with_the_more_confident_member_and_charges_both(
        two_models: list[Process], gateway_factory: Any, tmp_path: Path) -> None:
    a, b = two_models
    gw = gateway_factory(ensemble_config(tmp_path, a.url, b.url, "logprob"))
    created = gw.admin("POST", "/admin/keys", json={"name": "ens"}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=created["key"], max_retries=0, timeout=60)
    assert "both" in {m.id for m in client.models.list()}

    reply = client.chat.completions.create(model="both", messages=MESSAGES, max_tokens=8, temperature=0)

    direct = {"m1": mean_logprob(a, 8), "m2": mean_logprob(b, 8)}
    assert not math.isclose(direct["m1"][0], direct["m2"][0])  # different weights: a real choice
    best = max(direct, key=lambda name: direct[name][0])
    extra = reply.model_extra["lmserve_ensemble"]
    assert extra["winner"] == best and reply.model == "both"
    assert reply.choices[0].message.content == direct[best][1]
    assert reply.choices[0].logprobs is None  # asked for internally, not by the client
    outcomes = {m["model"]: m for m in extra["members"]}
    assert {name: outcomes[name]["mean_logprob"] for name in direct} == pytest.approx(
        {name: value[0] for name, value in direct.items()}, abs=1e-4)
    # The key pays for both members, and the answer says so.
    assert reply.usage.prompt_tokens == direct["m1"][2] + direct["m2"][2]
    assert reply.usage.completion_tokens == direct["m1"][3] + direct["m2"][3]
    usage = wait_usage(gw, created["id"], 2)
    assert {name: (row["prompt_tokens"], row["completion_tokens"]) for name, row in usage.items()} == {
        name: (value[2], value[3]) for name, value in direct.items()}

    with_logprobs = client.chat.completions.create(model="both", messages=MESSAGES, max_tokens=8, temperature=0,
                                                   logprobs=True)
    values = [t.logprob for t in with_logprobs.choices[0].logprobs.content]
    assert sum(values) / len(values) == pytest.approx(direct[best][0], abs=1e-4)


def test_first_rule_answers_with_the_fast_member_and_cancels_the_slow_one(
        two_models: list[Process], backends: Any, gateway_factory: Any, tmp_path: Path) -> None:
    """A fault test: one member is a backend that streams one chunk a second."""
    slow = backends("slow")
    slow.control(chunk_delay=1.0, content="x" * 400, chunk_chars=4)  # 100 s to finish
    gw = gateway_factory(ensemble_config(tmp_path, two_models[0].url, slow.url, "first"))
    created = gw.admin("POST", "/admin/keys", json={"name": "hedge"}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=created["key"], max_retries=0, timeout=60)

    started = time.monotonic()
    reply = client.completions.create(model="both", prompt="The quick brown fox", max_tokens=8, temperature=0)
    elapsed = time.monotonic() - started

    assert reply.model_extra["lmserve_ensemble"]["winner"] == "m1" and elapsed < 30
    assert reply.choices[0].text and reply.object == "text_completion"
    deadline = time.monotonic() + 10
    while slow.stats()["streams_cancelled"] < 1:  # the loser's connection was closed at once
        assert time.monotonic() < deadline, slow.stats()
        time.sleep(0.05)
    outcomes = {m["model"]: m["outcome"] for m in reply.model_extra["lmserve_ensemble"]["members"]}
    assert outcomes == {"m1": "won", "m2": "cancelled"}
    # The cancelled member is charged what it streamed (the fake's chunks so far), besides the winner.
    usage = wait_usage(gw, created["id"], 2)
    assert set(usage) == {"m1", "m2"} and usage["m2"]["completion_tokens"] >= 1
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(r'lmserve_gateway_ensemble_members_total\{ensemble="both",model="m2",outcome="cancelled"\} 1', metrics)


def test_a_failing_member_does_not_fail_the_ensemble(two_models: list[Process], backends: Any,
                                                     gateway_factory: Any, tmp_path: Path) -> None:
    broken = backends("broken")
    broken.control(status=400, fail_count=-1)  # not retried: the member fails at once
    for rule in ("first", "logprob"):
        gw = gateway_factory(ensemble_config(tmp_path, broken.url, two_models[1].url, rule), name=rule)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key(), max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="both", messages=MESSAGES, max_tokens=4)
        assert reply.model_extra["lmserve_ensemble"]["winner"] == "m2"
    only_broken = base_config(tmp_path, [{"name": "m1", "backends": [{"url": broken.url}]},
                                         {"name": "m2", "backends": [{"url": broken.url}]}],
                              ensembles=[{"name": "both", "members": ["m1", "m2"]}])
    gw = gateway_factory(only_broken, name="broken")
    response = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.create_key()}"},
                          json={"model": "both", "messages": MESSAGES})
    assert response.status_code == 400  # the first member's own error, passed through


def test_what_an_ensemble_cannot_answer_is_refused(backends: Any, gateway_factory: Any, tmp_path: Path) -> None:
    fake = backends("fake")
    gw = gateway_factory(ensemble_config(tmp_path, fake.url, fake.url, "first"))
    key = gw.create_key()
    restricted = gw.admin("POST", "/admin/keys", json={"name": "m1-only", "models": ["m1"]}).json()["key"]
    cases = [({"stream": True}, key, 400, "stream"), ({"n": 2}, key, 400, "n"), ({}, restricted, 403, None)]
    for extra, credential, status, param in cases:
        response = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {credential}"},
                              json={"model": "both", "messages": MESSAGES, **extra})
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
    assert fake.stats()["requests"] == 0


def test_a_hostile_logprobs_value_is_the_servers_to_refuse(backends: Any, gateway_factory: Any,
                                                           tmp_path: Path) -> None:
    fake = backends("fake")
    gw = gateway_factory(ensemble_config(tmp_path, fake.url, fake.url, "logprob"))
    response = httpx.post(gw.url + "/v1/completions", headers={"authorization": f"Bearer {gw.create_key()}"},
                          json={"model": "both", "prompt": "hi", "logprobs": "many"})
    assert response.status_code < 500, response.text


@pytest.mark.parametrize("ensemble, message", [
    ({"name": "m1", "members": ["m1", "m2"]}, "clashes"),
    ({"name": "e", "members": ["m1"]}, "two or more"),
    ({"name": "e", "members": ["m1", "nope"]}, "not a configured model"),
    ({"name": "e", "members": ["m1", "m2"], "rule": "vote"}, "rule must be one of"),
])
def test_bad_ensembles_are_refused_at_load(ensemble: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict({"models": [{"name": "m1"}, {"name": "m2"}], "ensembles": [ensemble]})
