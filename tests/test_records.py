"""Tests for the rollouts.jsonl record format (opdcli.records)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import time
import types
import warnings
from pathlib import Path

import pytest

from opdcli.errors import OpdError, RecordError
from opdcli.records import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    RolloutRecord,
    RolloutWriter,
    read_raw,
    read_records,
    schema,
    validate_record,
)

T = 4
K = 3


def make_obj(t: int = T, k: int | None = K, **overrides) -> dict:
    """A valid record object with T tokens and (optionally) top-k data; exact 5-decimal floats."""
    obj = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "run_id": "run-1",
        "step": 7,
        "policy_version": 7,
        "sample_id": "s-0",
        "prompt_id": "p-0",
        "prompt": "What is 2+2?\n",
        "response_text": "4 é",
        "response_ids": [10 + i for i in range(t)],
        "mask": [1] * t,
        "student_lp": [-0.5 - i for i in range(t)],
        "teacher_lp": [-0.25 - i for i in range(t)],
        "behavior_lp": [-0.5 - i for i in range(t)],
        "finished": True,
        "ref_lp": [-1.0] * t,
        "correct": True,
        "answer": "4",
        "method": {
            "name": "weights",
            "token": {"weight": [1.0] * t, "drift": [0] * t},
            "trajectory": {"release": 2, "ok": True, "tag": "x", "none": None, "score": 0.5},
        },
        "version_lag": 0,
        "freshness": 1.0,
    }
    if k:
        obj["topk"] = k
        obj["student_topk_ids"] = [[i, i + 1, i + 2][:k] for i in range(t)]
        obj["teacher_topk_ids"] = [[i + 1, i, i + 2][:k] for i in range(t)]
        obj["student_topk_lp"] = [[-0.5, -1.5, -2.5][:k] for _ in range(t)]
        obj["teacher_topk_lp"] = [[-0.25, -1.75, -3.0][:k] for _ in range(t)]
        obj["teacher_lp_on_student_topk"] = [[-0.75, -0.25, -4.0][:k] for _ in range(t)]
        obj["student_lp_on_teacher_topk"] = [[-1.5, -0.5, -2.5][:k] for _ in range(t)]
    obj.update(overrides)
    return obj


def write_lines(path: Path, objs: list, *, allow_nan: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, allow_nan=allow_nan) + "\n")


def collect(path: Path, **kwargs) -> tuple[list[RolloutRecord], list[str]]:
    partial: list[str] = []
    recs = list(read_records(path, on_partial=partial.append, **kwargs))
    return recs, partial


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def test_error_type():
    assert issubclass(RecordError, OpdError) and issubclass(RecordError, ValueError)


def test_round_trip_json():
    obj = make_obj()
    rec = RolloutRecord.from_json(obj)
    assert rec.num_tokens == T
    assert rec.student_lp == obj["student_lp"]
    assert rec.to_json() == obj
    assert RolloutRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_round_trip_minimal_record_omits_optional_fields():
    obj = make_obj(k=None)
    for name in ("ref_lp", "correct", "answer", "method", "version_lag", "freshness"):
        del obj[name]
    rec = RolloutRecord.from_json(obj)
    assert rec.topk is None and rec.ref_lp is None and rec.method is None
    assert rec.to_json() == obj
    assert list(rec.to_json())[:2] == ["schema", "schema_version"]


def test_empty_response_is_valid():
    obj = make_obj(t=0)
    rec = RolloutRecord.from_json(obj)
    assert rec.num_tokens == 0 and rec.student_topk_ids == []


def test_method_defaults_token_and_trajectory():
    rec = RolloutRecord.from_json(make_obj(method={"name": "plain"}))
    assert rec.method == {"name": "plain", "token": {}, "trajectory": {}}


def test_round_trip_through_file(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    objs = [make_obj(sample_id=f"s-{i}", step=i, policy_version=i) for i in range(5)]
    with RolloutWriter(path) as w:
        w.write(RolloutRecord.from_json(objs[0]))
        for obj in objs[1:]:
            w.write(obj)  # dicts are accepted too
        assert w.count == 5
    assert w.closed
    recs, partial = collect(path)
    assert partial == []
    assert [r.to_json() for r in recs] == objs
    raw = list(read_raw(path))
    assert [lineno for lineno, _ in raw] == [1, 2, 3, 4, 5]
    assert raw[2][1] == objs[2]


def test_writer_rounds_floats_and_writes_compact_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    obj = make_obj(
        student_lp=[-0.123456789, -1e-9, 0.0, -2.0],
        teacher_topk_lp=[[-0.333333333, -1.0, -2.0]] * T,
        freshness=0.987654321,
    )
    obj["method"]["token"]["weight"] = [0.1111111, 1.0, 1.0, 1.0]
    obj["method"]["trajectory"]["score"] = 2.0 / 3.0
    with RolloutWriter(path) as w:
        w.write(obj)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.count("\n") == 1
    assert ", " not in text and '": ' not in text
    (rec,) = read_records(path)
    assert rec.student_lp == [-0.12346, 0.0, 0.0, -2.0]
    assert rec.teacher_topk_lp[0] == [-0.33333, -1.0, -2.0]
    assert rec.freshness == 0.98765
    assert rec.method["token"]["weight"][0] == 0.11111
    assert '"drift":[0,0,0,0]' in text  # integer outputs are not turned into floats
    assert rec.method["trajectory"]["score"] == 0.66667
    assert obj["student_lp"][0] == -0.123456789  # the caller's object is not modified


def test_null_logprobs_allowed_only_where_mask_is_zero(tmp_path):
    obj = make_obj(mask=[1, 0, 1, 1], student_lp=[-0.5, None, -0.5, -0.5])
    obj["ref_lp"] = [-1.0, None, -1.0, -1.0]
    validate_record(obj)
    path = tmp_path / "r.jsonl"
    with RolloutWriter(path) as w:
        w.write(obj)
    (rec,) = read_records(path)
    assert rec.student_lp[1] is None and rec.ref_lp[1] is None

    bad = make_obj(student_lp=[-0.5, None, -0.5, -0.5])
    with pytest.raises(RecordError, match=r"student_lp\[1\].*null"):
        validate_record(bad)


def test_topk_zero_means_no_topk_data():
    obj = make_obj(k=None, topk=0)
    assert RolloutRecord.from_json(obj).topk == 0
    validate_record(make_obj(k=None, student_topk_ids=None))  # null counts as absent


def test_small_positive_logprob_within_tolerance():
    validate_record(make_obj(student_lp=[5e-5, -1.0, 0.0, 0.0001]))


# ---------------------------------------------------------------------------------------------
# Validation failures: every one raises RecordError naming file:line and the field
# ---------------------------------------------------------------------------------------------


def _drop(name):
    def mutate(obj):
        del obj[name]

    return mutate


def _set(name, value):
    def mutate(obj):
        obj[name] = value

    return mutate


def _set_in(path, value):
    def mutate(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _shorten(name):
    def mutate(obj):
        obj[name] = obj[name][:-1]

    return mutate


def _shorten_row(name, row=2):
    def mutate(obj):
        obj[name][row] = obj[name][row][:-1]

    return mutate


NAN = float("nan")
INF = float("inf")

# (id, mutation, substrings that must appear in the message)
FAILURES = [
    # missing fields
    *[(f"missing-{n}", _drop(n), [n, "missing"]) for n in schema.REQUIRED_FIELDS],
    ("missing-schema", _drop("schema"), ["schema", "missing"]),
    ("missing-schema_version", _drop("schema_version"), ["schema_version", "missing"]),
    ("missing-topk-matrix", _drop("teacher_topk_lp"), ["teacher_topk_lp", "missing"]),
    ("missing-method-name", _set("method", {"token": {}}), ["method.name", "missing"]),
    # unknown fields
    ("unknown-typo", _set("studnet_lp", [0.0] * T), ["studnet_lp", "did you mean 'student_lp'"]),
    ("unknown-other", _set("zzz_extra", 1), ["unknown field 'zzz_extra'"]),
    ("unknown-method-key", _set_in(["method", "extra"], 1), ["method.extra", "unknown"]),
    # wrong types
    ("type-schema", _set("schema", "opd.other"), ["schema", "opd.rollout", "opd.other"]),
    ("type-schema_version", _set("schema_version", "1"), ["schema_version", "string"]),
    ("type-run_id", _set("run_id", 5), ["run_id", "a string", "int 5"]),
    ("type-prompt", _set("prompt", None), ["'prompt'", "null"]),
    ("type-step-str", _set("step", "3"), ["step", "int >= 0", "string '3'"]),
    ("type-step-negative", _set("step", -1), ["step", "int >= 0", "int -1"]),
    ("type-step-bool", _set("step", True), ["step", "true"]),
    ("type-policy_version", _set("policy_version", 1.5), ["policy_version", "float 1.5"]),
    ("type-finished", _set("finished", 1), ["finished", "true/false", "int 1"]),
    ("type-response_ids", _set("response_ids", "abc"), ["response_ids", "string"]),
    ("type-response_ids-elem", _set_in(["response_ids", 2], 1.0), ["response_ids[2]", "float"]),
    ("type-response_ids-neg", _set_in(["response_ids", 0], -3), ["response_ids[0]", "-3"]),
    ("type-student_lp", _set("student_lp", {"a": 1}), ["student_lp", "object"]),
    ("type-student_lp-elem", _set_in(["student_lp", 1], "x"), ["student_lp[1]", "number"]),
    ("type-teacher_lp-bool", _set_in(["teacher_lp", 0], True), ["teacher_lp[0]", "true"]),
    ("type-topk-ids-elem", _set_in(["student_topk_ids", 1, 2], "7"), ["student_topk_ids[1][2]"]),
    ("type-topk-ids-neg", _set_in(["teacher_topk_ids", 3, 0], -1), ["teacher_topk_ids[3][0]"]),
    ("type-topk-ids-float", _set_in(["teacher_topk_ids", 0, 1], 2.0), ["teacher_topk_ids[0][1]"]),
    ("type-topk-row", _set_in(["student_topk_lp", 1], 5), ["student_topk_lp[1]", "int 5"]),
    ("type-topk-lp-elem", _set_in(["teacher_topk_lp", 0, 0], None), ["teacher_topk_lp[0][0]"]),
    ("type-topk", _set("topk", "3"), ["topk", "0..64"]),
    ("type-correct", _set("correct", "yes"), ["correct", "true/false or null"]),
    ("type-answer", _set("answer", 4), ["answer", "string or null"]),
    ("type-version_lag", _set("version_lag", -2), ["version_lag", "int >= 0 or null"]),
    ("type-freshness", _set("freshness", "new"), ["freshness", "finite float"]),
    ("type-method", _set("method", "weights"), ["method", "string 'weights'"]),
    ("type-method-name", _set_in(["method", "name"], ""), ["method.name", "non-empty"]),
    ("type-method-token", _set_in(["method", "token"], [1.0]), ["method.token", "list"]),
    ("type-method-token-elem", _set_in(["method", "token", "weight", 0], "a"), ["weight[0]"]),
    ("type-method-traj", _set_in(["method", "trajectory", "x"], [1]), ["trajectory.x"]),
    # NaN / inf / positive log-probs
    ("nan-student_lp", _set_in(["student_lp", 2], NAN), ["student_lp[2]", "finite", "nan"]),
    ("inf-teacher_lp", _set_in(["teacher_lp", 0], INF), ["teacher_lp[0]", "finite", "inf"]),
    ("ninf-behavior_lp", _set_in(["behavior_lp", 3], -INF), ["behavior_lp[3]", "-inf"]),
    ("nan-ref_lp", _set_in(["ref_lp", 1], NAN), ["ref_lp[1]", "finite"]),
    ("nan-topk_lp", _set_in(["student_topk_lp", 2, 1], NAN), ["student_topk_lp[2][1]", "nan"]),
    ("inf-teacher_topk_lp", _set_in(["teacher_topk_lp", 3, 2], -INF), ["teacher_topk_lp[3][2]"]),
    ("inf-on-student", _set_in(["teacher_lp_on_student_topk", 0, 0], INF), ["on_student_topk[0]"]),
    ("nan-on-teacher", _set_in(["student_lp_on_teacher_topk", 1, 0], NAN), ["on_teacher_topk[1]"]),
    ("nan-method-token", _set_in(["method", "token", "weight", 3], NAN), ["weight[3]", "nan"]),
    ("inf-method-traj", _set_in(["method", "trajectory", "score"], INF), ["trajectory.score"]),
    ("nan-freshness", _set("freshness", NAN), ["freshness", "nan"]),
    ("positive-student_lp", _set_in(["student_lp", 0], 0.5), ["student_lp[0]", "<= 0.0001"]),
    ("positive-topk_lp", _set_in(["teacher_topk_lp", 1, 0], 0.01), ["teacher_topk_lp[1][0]"]),
    # mismatched lengths (outer T and inner K)
    *[
        (f"length-{n}", _shorten(n), [f"'{n}'", "length 4", "length 3"])
        for n in (
            "mask",
            "student_lp",
            "teacher_lp",
            "behavior_lp",
            "ref_lp",
            "student_topk_ids",
            "teacher_topk_ids",
            "student_topk_lp",
            "teacher_topk_lp",
            "teacher_lp_on_student_topk",
            "student_lp_on_teacher_topk",
        )
    ],
    *[
        (f"row-length-{n}", _shorten_row(n), [f"{n}[2]", "length 3 (= topk)", "length 2"])
        for n in (
            "student_topk_ids",
            "teacher_topk_ids",
            "student_topk_lp",
            "teacher_topk_lp",
            "teacher_lp_on_student_topk",
            "student_lp_on_teacher_topk",
        )
    ],
    ("length-method-token", _set_in(["method", "token", "weight"], [1.0]), ["weight", "length"]),
    # top-k bounds and consistency
    ("topk-too-large", _set("topk", 65), ["topk", "0..64", "int 65"]),
    ("topk-negative", _set("topk", -1), ["topk", "0..64"]),
    ("topk-zero-with-data", _set("topk", 0), ["student_topk_ids", "topk is absent or 0"]),
    # versions
    ("newer-version", _set("schema_version", 2), ["schema_version", "newer", "upgrade opd"]),
    ("older-version", _set("schema_version", 0), ["schema_version", "int 0"]),
    # mask
    ("mask-2", _set_in(["mask", 1], 2), ["mask[1]", "0 or 1", "int 2"]),
    ("mask-bool", _set_in(["mask", 0], True), ["mask[0]", "0 or 1", "true"]),
    ("mask-float", _set_in(["mask", 3], 1.0), ["mask[3]", "float 1.0"]),
]


@pytest.mark.parametrize(
    ("mutate", "needles"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_validation_failure_names_line_and_field(tmp_path, mutate, needles):
    good = make_obj(sample_id="good")
    bad = make_obj(sample_id="bad")
    mutate(bad)
    path = tmp_path / "rollouts.jsonl"
    write_lines(path, [good, bad, good], allow_nan=True)
    with pytest.raises(RecordError) as info:
        list(read_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)

    # the same failure via the direct API carries the caller's `where`
    with pytest.raises(RecordError, match=r"^rollouts\.jsonl:12: "):
        RolloutRecord.from_json(bad, where="rollouts.jsonl:12")
    with pytest.raises(RecordError, match=r"^rollout record: "):
        validate_record(bad)


def test_failures_cover_every_field():
    ids = " ".join(f[0] for f in FAILURES)
    for name in schema._ALL_FIELDS:
        assert name in ids, name


def test_validate_rejects_non_object():
    with pytest.raises(RecordError, match="expected a JSON object"):
        validate_record([1, 2])  # type: ignore[arg-type]


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(make_obj()) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r":2: expected a JSON object.*list"):
        list(read_records(path))


def test_read_raw_without_validation_still_refuses_newer_versions(tmp_path):
    path = tmp_path / "r.jsonl"
    bad_field = make_obj(step="not checked")
    write_lines(path, [bad_field])
    ((lineno, obj),) = read_raw(path, validate=False)
    assert lineno == 1 and obj["step"] == "not checked"
    write_lines(path, [make_obj(schema_version=3)])
    with pytest.raises(RecordError, match=r":1: .*upgrade opd"):
        list(read_raw(path, validate=False))


def test_read_records_without_validation_requires_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    obj = make_obj()
    del obj["mask"]
    write_lines(path, [obj])
    with pytest.raises(RecordError, match=r":1: missing required field 'mask'"):
        list(read_records(path, validate=False))


# ---------------------------------------------------------------------------------------------
# Partial lines, garbage, encodings, empty and missing files
# ---------------------------------------------------------------------------------------------


def test_truncated_last_line_is_reported_and_skipped(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    objs = [make_obj(sample_id=f"s-{i}") for i in range(3)]
    write_lines(path, objs)
    line = json.dumps(make_obj(sample_id="cut"))
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[: len(line) // 2])
    recs, partial = collect(path)
    assert [r.sample_id for r in recs] == ["s-0", "s-1", "s-2"]
    assert len(partial) == 1
    assert f"{path}:4:" in partial[0] and "incomplete last line" in partial[0]

    with pytest.warns(UserWarning, match=r":4: skipped an incomplete last line"):
        assert len(list(read_records(path))) == 3
    with pytest.warns(UserWarning):
        assert [n for n, _ in read_raw(path)] == [1, 2, 3]


def test_complete_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(make_obj()) + "\n" + json.dumps(make_obj()), encoding="utf-8")
    recs, partial = collect(path)
    assert len(recs) == 2 and partial == []


def test_last_line_cut_inside_multibyte_character_is_partial(tmp_path):
    path = tmp_path / "r.jsonl"
    write_lines(path, [make_obj()])
    cut = json.dumps(make_obj(prompt="é"), ensure_ascii=False).encode("utf-8")
    cut = cut[: cut.index("é".encode()) + 1]  # first byte of a two-byte character
    with open(path, "ab") as f:
        f.write(cut)
    recs, partial = collect(path)
    assert len(recs) == 1 and len(partial) == 1


def test_nul_filled_tail_is_partial(tmp_path):
    path = tmp_path / "r.jsonl"
    write_lines(path, [make_obj()])
    with open(path, "ab") as f:
        f.write(b"\x00" * 100)
    recs, partial = collect(path)
    assert len(recs) == 1 and len(partial) == 1


def test_truncated_line_in_the_middle_raises(tmp_path):
    path = tmp_path / "r.jsonl"
    line = json.dumps(make_obj())
    path.write_text(line + "\n" + line[:50] + "\n" + line + "\n", encoding="utf-8")
    partial: list[str] = []
    it = read_records(path, on_partial=partial.append)
    assert next(it).sample_id == "s-0"
    with pytest.raises(RecordError, match=r":2: not valid JSON"):
        next(it)
    assert partial == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        b"\xff\xfe\x00{\x00}\x00\n",
        b"\x00\x01\x02\x03garbage\n",
        b"\xde\xad\xbe\xef",  # also as an unterminated last line: not a cut-off record
    ],
    ids=["png", "utf16", "control", "tail"],
)
def test_binary_garbage_raises(tmp_path, garbage):
    path = tmp_path / "r.jsonl"
    with open(path, "wb") as f:
        f.write((json.dumps(make_obj()) + "\n").encode())
        f.write(garbage)
    with pytest.raises(RecordError, match=rf"{path.name}:\d+: ") as info:
        list(read_records(path, on_partial=pytest.fail))
    assert not isinstance(info.value, UnicodeDecodeError)


def test_non_utf8_raises_record_error(tmp_path):
    path = tmp_path / "r.jsonl"
    line = json.dumps(make_obj(prompt="caf\u00e9"), ensure_ascii=False)
    with open(path, "wb") as f:
        f.write(line.encode("latin-1") + b"\n")
    with pytest.raises(RecordError, match=r":1: file is not UTF-8 text") as info:
        list(read_records(path))
    assert not isinstance(info.value, UnicodeDecodeError)
    with pytest.raises(RecordError, match="not UTF-8"):
        list(read_raw(path))


def test_utf8_bom_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "r.jsonl"
    line = json.dumps(make_obj())
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n\n   \n" + line.encode() + b"\r\n\n")
    assert [n for n, _ in read_raw(path)] == [1, 4]


def test_empty_file_yields_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    path.touch()
    assert collect(path) == ([], [])
    path.write_text("\n\n", encoding="utf-8")
    assert collect(path) == ([], [])
    assert list(read_raw(path)) == []


def test_missing_file_raises_record_error_naming_path(tmp_path):
    path = tmp_path / "nope" / "rollouts.jsonl"
    with pytest.raises(RecordError, match="rollouts file not found") as info:
        read_records(path)  # raised at call time, before iterating
    assert str(path) in str(info.value)
    with pytest.raises(RecordError, match=str(path.name)):
        read_raw(path)
    with pytest.raises(RecordError, match="is a directory"):
        read_records(tmp_path)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def test_writer_refuses_nan_and_leaves_file_unchanged(tmp_path):
    path = tmp_path / "r.jsonl"
    with RolloutWriter(path) as w:
        w.write(make_obj())
    before = path.read_bytes()
    bad = make_obj()
    bad["teacher_lp"][1] = NAN
    with RolloutWriter(path) as w:
        with pytest.raises(RecordError, match=r"teacher_lp\[1\].*finite"):
            w.write(bad)
        with pytest.raises(RecordError, match=r"freshness"):
            w.write(dataclasses.replace(RolloutRecord.from_json(make_obj()), freshness=INF))
        with pytest.raises(RecordError, match="unknown field 'oops'"):
            w.write(make_obj(oops=1))
        with pytest.raises(RecordError, match="expected a RolloutRecord or dict"):
            w.write([1, 2, 3])  # type: ignore[arg-type]
        assert w.count == 0
    assert path.read_bytes() == before


def test_writer_rejects_a_record_built_with_wrong_types(tmp_path):
    rec = RolloutRecord.from_json(make_obj())
    bad = dataclasses.replace(rec, mask=[1, 1])
    with RolloutWriter(tmp_path / "r.jsonl") as w, pytest.raises(RecordError, match="'mask'"):
        w.write(bad)


def test_writer_appends_and_fsyncs(tmp_path, monkeypatch):
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        real_fsync(fd)

    import opdcli.records.io as records_io

    monkeypatch.setattr(records_io.os, "fsync", counting_fsync)
    path = tmp_path / "r.jsonl"
    path.touch()  # an existing file: no directory fsync on open
    with RolloutWriter(path, fsync_every=2) as w:
        for i in range(5):
            w.write(make_obj(sample_id=f"a{i}"))
        assert len(calls) == 2  # after records 2 and 4
    assert len(calls) == 3  # and on close
    with RolloutWriter(path) as w:  # append, not overwrite
        w.write(make_obj(sample_id="b0"))
        w.close()
        with pytest.raises(ValueError, match="closed"):
            w.write(make_obj())
    assert [r.sample_id for r in read_records(path)] == ["a0", "a1", "a2", "a3", "a4", "b0"]
    with pytest.raises(ValueError, match="fsync_every"):
        RolloutWriter(path, fsync_every=-1)


def test_writer_bad_path_raises_record_error(tmp_path):
    with pytest.raises(RecordError, match="cannot open"):
        RolloutWriter(tmp_path / "missing-dir" / "r.jsonl")


def test_crash_then_resume_truncates_partial_record(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    with RolloutWriter(path) as w:
        w.write(make_obj(sample_id="a"))
        w.write(make_obj(sample_id="b"))
    complete = path.read_bytes()
    # simulate a run killed in the middle of writing a third record
    line = json.dumps(make_obj(sample_id="cut"), separators=(",", ":"))
    with open(path, "ab") as f:
        f.write(line[:-20].encode())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = RolloutWriter(path)
    assert len(caught) == 1
    assert "removed a partial last line" in str(caught[0].message)
    assert path.read_bytes() == complete  # back to the last complete record
    with w:
        w.write(make_obj(sample_id="c"))

    recs, partial = collect(path)
    assert [r.sample_id for r in recs] == ["a", "b", "c"]
    assert partial == []

    # a clean file is opened without any warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RolloutWriter(path).close()


def test_crash_during_first_record_leaves_empty_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"schema":"opd.rol')
    with pytest.warns(UserWarning, match="partial last line"):
        RolloutWriter(path).close()
    assert path.read_bytes() == b""


def test_resume_after_complete_line_without_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(make_obj(sample_id="a")), encoding="utf-8")
    with pytest.warns(UserWarning, match="no trailing newline"):
        w = RolloutWriter(path)
    with w:
        w.write(make_obj(sample_id="b"))
    assert [r.sample_id for r in read_records(path)] == ["a", "b"]


def test_writer_refuses_to_append_after_foreign_tail(tmp_path):
    path = tmp_path / "r.jsonl"
    content = b"line one\n\x89PNG\x00\x01"
    path.write_bytes(content)
    with pytest.raises(RecordError, match="refusing to append"):
        RolloutWriter(path)
    assert path.read_bytes() == content


# ---------------------------------------------------------------------------------------------
# Streaming and speed
# ---------------------------------------------------------------------------------------------


def test_streaming_read_of_2000_records(tmp_path):
    path = tmp_path / "r.jsonl"
    with RolloutWriter(path) as w:
        for i in range(2000):
            w.write(make_obj(sample_id=f"s-{i}", step=i, policy_version=i))
    gen = read_records(path)
    assert isinstance(gen, types.GeneratorType)
    first = list(itertools.islice(gen, 3))
    assert [r.sample_id for r in first] == ["s-0", "s-1", "s-2"]
    assert next(gen).sample_id == "s-3"  # continues where it stopped
    gen.close()
    assert sum(1 for _ in read_raw(path)) == 2000

    # lines are parsed lazily: garbage at the end is not reached by a short read
    with open(path, "ab") as f:
        f.write(b"not json\n")
    assert len(list(itertools.islice(read_records(path), 10))) == 10
    with pytest.raises(RecordError, match=":2001: not valid JSON"):
        for _ in read_records(path):
            pass


def test_validation_is_fast_for_a_long_record():
    n, k = 1000, 16
    obj = make_obj(t=n, k=None)
    obj.update(
        topk=k,
        student_topk_ids=[list(range(i, i + k)) for i in range(n)],
        teacher_topk_ids=[list(range(i + 1, i + 1 + k)) for i in range(n)],
        student_topk_lp=[[-0.1 * (j + 1) for j in range(k)] for _ in range(n)],
        teacher_topk_lp=[[-0.2 * (j + 1) for j in range(k)] for _ in range(n)],
    )
    obj = json.loads(json.dumps(obj))
    validate_record(obj)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        validate_record(obj)
        best = min(best, time.perf_counter() - start)
    assert best < 0.02, f"validation took {best * 1e3:.1f} ms"

    # the fast path still finds a single bad entry deep inside a matrix
    bad = copy.deepcopy(obj)
    bad["teacher_topk_lp"][987][11] = NAN
    with pytest.raises(RecordError, match=r"teacher_topk_lp\[987\]\[11\]"):
        validate_record(bad)
    bad = copy.deepcopy(obj)
    bad["student_topk_ids"][500][3] = -5
    with pytest.raises(RecordError, match=r"student_topk_ids\[500\]\[3\]"):
        validate_record(bad)
