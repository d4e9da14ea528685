"""Bench registry and data: specs load, names are unique, fixture rows in the upstream formats
parse for every bench, LiveCodeBench tests decode without unpickling code, the cache checks
its manifest, and a fetch without network fails with one clear line."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import re
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks import data as bench_data
from benchmarks import lcb
from benchmarks.prompts import build_messages
from benchmarks.registry import BENCHMARKS, get_bench, load_specs
from opdcli.cli import app
from opdcli.errors import BenchmarkNotFoundError, ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
BENCH_FILES = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "amc23": "amc23.jsonl",
               "hmmt25": "hmmt25.jsonl", "gpqa-diamond": "gpqa_diamond.jsonl",
               "livecodebench": "livecodebench.jsonl"}


def test_registry_has_every_bench_and_lists_them():
    assert set(BENCH_FILES) | {"toy-arith"} <= set(BENCHMARKS)
    result = CliRunner().invoke(app, ["eval", "--list"])
    assert result.exit_code == 0
    for name in BENCHMARKS:
        assert name in result.output


def test_every_hub_bench_pins_a_commit(tmp_path):
    hub = [s for s in BENCHMARKS.values() if "hub" in s.dataset]
    assert len(hub) == 6
    for spec in hub:
        assert re.fullmatch(r"[0-9a-f]{40}", spec.dataset["revision"]), spec.name
    bad = tmp_path / "specs"
    bad.mkdir()
    (bad / "x.yaml").write_text("name: x\nversion: 1\nkind: math\ndataset: {hub: a/b, revision: main}\n"
                                "prompt: '{problem}'\nscorer: math\n")
    with pytest.raises(ConfigError, match="dataset.revision 'main' is not a commit sha"):
        load_specs(bad)


def test_unknown_bench_suggests_the_closest():
    with pytest.raises(BenchmarkNotFoundError, match="did you mean 'aime24'") as info:
        get_bench("aime2024")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert "gpqa-diamond" in str(info.value)
    result = CliRunner().invoke(app, ["eval", "--bench", "gpqa_diamon", "--model", "toy:teacher"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'gpqa-diamond'" in lines[0], result.output


def test_duplicate_names_and_unknown_keys_raise(tmp_path):
    text = (Path(BENCHMARKS["aime24"].path)).read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(ConfigError, match="duplicate benchmark name 'aime24'"):
        load_specs(tmp_path)
    (tmp_path / "b.yaml").write_text(text.replace("name: aime24", "name: other") + "promt: typo\n")
    with pytest.raises(ConfigError, match="unknown key.*promt"):
        load_specs(tmp_path)


@pytest.mark.parametrize("bench", sorted(BENCH_FILES))
def test_fixture_rows_parse(bench):
    spec = get_bench(bench)
    data = bench_data.load(spec, data_file=str(FIX / BENCH_FILES[bench]))
    assert data.rows and len(data.sha256) == 64
    assert data.source["file_sha256"] and len({r["id"] for r in data.rows}) == len(data.rows)
    for row in data.rows:
        messages = build_messages(spec, row)
        assert messages[-1]["role"] == "user" and "{" + "problem}" not in messages[-1]["content"]
        if spec.kind == "math":
            assert row["problem"] in messages[-1]["content"] and "\\boxed{}" in messages[-1]["content"]
            assert isinstance(row["answer"], str) and row["answer"]
        elif spec.kind == "mcq":
            assert len(row["choices"]) == 4 and row["answer"] in "ABCD"
            assert "A) " in messages[-1]["content"] and "one of ABCD" in messages[-1]["content"]
        else:
            assert row["tests"] and all(t["testtype"] in ("stdin", "functional") for t in row["tests"])
    # the same file gives the same normalised data
    assert bench_data.load(spec, data_file=str(FIX / BENCH_FILES[bench])).sha256 == data.sha256


def test_math_answers_normalise():
    rows = bench_data.load(get_bench("amc23"), data_file=str(FIX / "amc23.jsonl")).rows
    assert [r["answer"] for r in rows] == ["55", "5"]  # floats 55.0 -> "55"
    hmmt = bench_data.load(get_bench("hmmt25"), data_file=str(FIX / "hmmt25.jsonl")).rows
    assert hmmt[0]["answer"] == "\\frac{1}{2}" and hmmt[0]["id"] == "1"


def test_gpqa_shuffle_is_seeded_and_recorded():
    spec = get_bench("gpqa-diamond")
    raw = [json.loads(line) for line in (FIX / "gpqa_diamond.jsonl").read_text().splitlines()]
    rows = bench_data.normalise(spec, raw)
    for row, src in zip(rows, raw, strict=True):
        assert row["choices"][ord(row["answer"]) - 65] == src["Correct Answer"].strip()
        assert sorted(row["choices"]) == sorted(s.strip() for s in [src["Correct Answer"], src["Incorrect Answer 1"],
                                                                      src["Incorrect Answer 2"], src["Incorrect Answer 3"]])
        assert row["shuffle_seed"] == bench_data.row_seed(spec.shuffle_seed, row["id"])
    assert bench_data.normalise(spec, raw) == rows
    orders = {tuple(bench_data.normalise(spec, raw, shuffle_seed=s)[0]["choices"]) for s in range(8)}
    assert len(orders) > 1  # the seed matters


def test_lcb_private_tests_decode_without_unpickling_code():
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    assert lcb.decode_tests(blob, "row") == tests
    assert lcb.decode_tests(json.dumps(tests), "row") == tests

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/opd-unpickle-pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(DataError, match="refusing to load"):
        lcb.decode_tests(evil, "row")
    assert not Path("/tmp/opd-unpickle-pwned").exists()


def test_lcb_options_release_and_date_window():
    spec = get_bench("livecodebench")
    assert lcb.shard_files("release_v3") == ["test.jsonl", "test2.jsonl", "test3.jsonl"]
    assert lcb.shard_files("v5") == ["test5.jsonl"] and lcb.shard_files("v4_v6") == ["test4.jsonl", "test5.jsonl", "test6.jsonl"]
    with pytest.raises(DataError, match="unknown LiveCodeBench release"):
        lcb.shard_files("latest")
    f = str(FIX / "livecodebench.jsonl")
    window = bench_data.load(spec, {"start_date": "2025-01-01", "end_date": "2025-02-28"}, data_file=f)
    assert [r["id"] for r in window.rows] == ["3999"]
    assert window.source["options"]["release"] == "release_v6"
    with pytest.raises(ConfigError, match="--release"):
        bench_data.load(spec, {"release": "v5"}, data_file=f)
    with pytest.raises(ConfigError, match="not a date"):
        bench_data.load(spec, {"start_date": "last year"}, data_file=f)
    with pytest.raises(ConfigError, match="cannot be used with bench 'aime24'"):
        bench_data.load(get_bench("aime24"), {"release": "v5"}, data_file=str(FIX / "aime24.jsonl"))


def test_toy_bench_is_the_heldout_split():
    from opdcli.config import DataConfig
    from opdcli.data import heldout_prompts

    rows = bench_data.load(get_bench("toy-arith"), limit=5).rows
    prompts = heldout_prompts(DataConfig(), 5)
    assert [r["answer"] for r in rows] == [p.answer for p in prompts]
    assert [r["problem"] for r in rows] == [p.messages[-1]["content"] for p in prompts]


def test_fetch_writes_cache_and_manifest_then_detects_tampering(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    spec = dataclasses.replace(get_bench("aime24"), dataset={**get_bench("aime24").dataset, "revision": None})
    raw = [json.loads(line) for line in (FIX / "aime24.jsonl").read_text().splitlines()]
    monkeypatch.setattr(bench_data, "_resolve_revision", lambda spec, rev: "abc123")
    monkeypatch.setattr(bench_data, "_download", lambda spec, options, revision: raw)
    with pytest.raises(DataError, match="downloaded 3 rows, the spec expects 30"):
        bench_data.fetch(spec)
    monkeypatch.setattr(bench_data, "_download", lambda spec, options, revision: raw * 10)
    monkeypatch.setattr(bench_data, "normalise", lambda spec, rows: [
        {"id": str(i), "problem": r["Problem"], "answer": str(r["Answer"])} for i, r in enumerate(rows)])
    with pytest.warns(UserWarning, match="no pinned dataset.revision"):
        folder = bench_data.fetch(spec)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == 30 and manifest["revision"] == "abc123" and len(manifest["sha256"]) == 64
    loaded = bench_data.load(spec)
    assert loaded.sha256 == manifest["sha256"] and loaded.source["revision"] == "abc123"
    with (folder / "data.jsonl").open("a") as fh:
        fh.write('{"id": "x", "problem": "p", "answer": "1"}\n')
    with pytest.raises(DataError, match="does not match its manifest sha256"):
        bench_data.load(spec)


def test_fetch_without_network_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # every Hub request refused
    result = CliRunner().invoke(app, ["eval", "fetch", "--bench", "aime25"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot download bench 'aime25'"), result.output
    assert not (tmp_path / "benchmarks" / "aime25").exists()
