"""Prompt sources on local files (JSONL, JSON, parquet), the toy stream, and their errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from opdcli.config import DataConfig
from opdcli.data import PromptSource, heldout_prompts, read_rows, render
from opdcli.errors import DataError

ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "answer": 4, "solution": "2+2=4. \\boxed{4}"},
    {"id": "b", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
     "answer": "2"},
    {"id": "c", "prompt": "3*3?", "answer": "9"},
]


@pytest.fixture
def files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    js = tmp_path / "p.json"
    js.write_text(json.dumps(ROWS))
    pq = tmp_path / "p.parquet"
    pd.DataFrame([{"id": r["id"], "question": r["prompt"] if isinstance(r["prompt"], str) else "x",
                   "answer": str(r["answer"])} for r in ROWS]).to_parquet(pq)
    return {"jsonl": jsonl, "json": js, "parquet": pq}


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_local_files_become_chat_prompts(files, kind, toy_tokenizer):
    src = PromptSource(DataConfig(source=str(files[kind])), seed=0)
    batch = src.next_batch(3)
    assert sorted(p.prompt_id for p in batch) == ["a", "b", "c"]  # one shuffled epoch
    by_id = {p.prompt_id: p for p in batch}
    assert by_id["a"].messages == ({"role": "user", "content": "What is 2+2?"},)
    assert by_id["a"].answer == "4" and by_id["a"].solution.endswith("\\boxed{4}")
    assert by_id["b"].messages[0] == {"role": "system", "content": "Be brief."}
    assert render(toy_tokenizer, by_id["c"]).endswith("<|im_start|>assistant\n")


def test_parquet_with_a_custom_prompt_field(files):
    src = PromptSource(DataConfig(source=str(files["parquet"]), prompt_field="question"), seed=0)
    assert {p.prompt_id for p in src.next_batch(3)} == {"a", "b", "c"}


def test_stream_is_seeded_and_resumable(files):
    cfg = DataConfig(source=str(files["jsonl"]))
    a = [p.prompt_id for p in PromptSource(cfg, 1).next_batch(7)]
    assert a == [p.prompt_id for p in PromptSource(cfg, 1).next_batch(7)]
    src = PromptSource(cfg, 1)
    src.skip_to(4)
    assert [p.prompt_id for p in src.next_batch(3)] == a[4:]
    toy = PromptSource(DataConfig(), 3)
    first = [p.prompt_id for p in toy.next_batch(5)]
    toy.skip_to(2)
    assert [p.prompt_id for p in toy.next_batch(3)] == first[2:]


def test_max_prompts_and_eval_source(files):
    src = PromptSource(DataConfig(source=str(files["jsonl"]), max_prompts=1), 0)
    assert {p.prompt_id for p in src.next_batch(4)} == {"a"}
    held = heldout_prompts(DataConfig(source=str(files["jsonl"]), eval_source=str(files["jsonl"])), 2)
    assert [p.answer for p in held] == ["4", "2"]
    assert heldout_prompts(DataConfig(source=str(files["jsonl"])), 2) is None
    toy_held = heldout_prompts(DataConfig(), 10)
    assert len(toy_held) == 10 and all(p.answer is not None for p in toy_held)


@pytest.mark.parametrize(("content", "suffix", "match"), [
    ("", ".jsonl", "dataset is empty"),
    ('{"prompt": "x"}\nnot json\n', ".jsonl", r":2: not valid JSON"),
    ('[1, 2]\n', ".jsonl", "expected a JSON object"),
    ('{"question": "x"}\n', ".jsonl", "has no field 'prompt'"),
    ('{"prompt": 5}\n', ".jsonl", "must be a string or a list of chat messages"),
    ('{"a": 1}', ".json", "expected a JSON list"),
    ("x", ".csv", "unknown extension"),
])
def test_bad_files_get_clear_errors(tmp_path, content, suffix, match):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        PromptSource(DataConfig(source=str(f)), 0)


def test_missing_file_and_binary_garbage(tmp_path):
    with pytest.raises(DataError, match="is not a file"):
        read_rows(str(tmp_path / "nope.jsonl"), "train")
    garbage = tmp_path / "g.jsonl"
    garbage.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(str(garbage), "train")
    bad_pq = tmp_path / "b.parquet"
    bad_pq.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        read_rows(str(bad_pq), "train")


def test_dotted_fields_reach_into_nested_records(tmp_path):
    """DAPO-Math-17k keeps its answer at reward_model.ground_truth and its prompt as messages."""
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2", "style": "rule"},
             "extra_info": {"index": "x1"}},
            {"prompt": [{"role": "user", "content": "2+3?"}], "reward_model": {"ground_truth": 5}}]
    path = tmp_path / "dapo.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = PromptSource(DataConfig(source=str(path), answer_field="reward_model.ground_truth"), seed=0).next_batch(2)
    assert sorted(p.answer for p in got) == ["2", "5"]
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"q": {"text": "3*3?"}, "answer": "9"}) + "\n")
    (p,) = PromptSource(DataConfig(source=str(nested), prompt_field="q.text"), seed=0).next_batch(1)
    assert p.messages == ({"role": "user", "content": "3*3?"},)
    with pytest.raises(DataError, match="has no field 'q.missing'"):
        PromptSource(DataConfig(source=str(nested), prompt_field="q.missing"), seed=0)
