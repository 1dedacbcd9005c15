"""Datasets as `lmserve bench --dataset` reads them: JSONL prompts or messages, ShareGPT JSON."""

import json

import pytest

from lmserve.bench.workload import RequestSpec, from_dataset, parse_list


def test_jsonl_prompts_messages_and_token_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "Hello", "max_tokens": 7}),
        "",
        json.dumps({"prompt": [5, 6, 7]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    ]) + "\n")
    specs = from_dataset(path, None, (4, 20))
    assert specs == [RequestSpec("Hello", 7), RequestSpec([5, 6, 7], 20),
                     RequestSpec("", 3, ({"role": "user", "content": "Hi"},))]
    assert from_dataset(path, 2, (4, 20)) == specs[:2]
    assert from_dataset(path, 7, (4, 20)) == specs + specs + specs[:1]


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "no prompt"}', "d.jsonl:1"),
    ('{"prompt": ""}', "non-empty"),
    ('{"messages": []}', "non-empty list"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be >= 1"),
    ("not json", "d.jsonl:1"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=fragment):
        from_dataset(path, None, (1, 8))


def test_sharegpt_first_human_turn_and_answer_length(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "a" * 30}]},
        {"conversations": [{"from": "human", "value": "Q2"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q3"},
                           {"from": "gpt", "value": "b" * 4}, {"from": "human", "value": "later"},
                           {"from": "gpt", "value": "c" * 999}]},
        {"conversations": [{"from": "human", "value": "Q4"}, {"from": "gpt", "value": "d" * 2000}]},
        {"no": "conversations"},
    ]))
    # 30 chars -> 8 tokens; 4 -> 1, raised to the floor 2; 2000 -> 500, clipped to 64.
    assert from_dataset(path, None, (2, 64)) == [RequestSpec("Q1", 8), RequestSpec("Q3", 2), RequestSpec("Q4", 64)]
    assert len(from_dataset(path, 10, (2, 64))) == 10


def test_sharegpt_without_usable_conversations(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "alone"}]}]))
    with pytest.raises(ValueError, match="no ShareGPT conversation"):
        from_dataset(path, None, (1, 8))
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="expected a ShareGPT list"):
        from_dataset(path, None, (1, 8))


def test_parse_list():
    assert parse_list("1,8,32", int, "--concurrency") == [1, 8, 32]
    assert parse_list("0.5,2", float, "--rates") == [0.5, 2.0]
    with pytest.raises(ValueError, match="--rates: every value must be > 0"):
        parse_list("1,0", float, "--rates")
    with pytest.raises(ValueError, match="--concurrency: expected a comma list"):
        parse_list("1,,2", int, "--concurrency")
