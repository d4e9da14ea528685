"""`opd diagnose`: planted effects are found, bad files fail cleanly, reports are complete.

Synthetic rollouts (benchmarks.diagnose_speed.synthetic_record, written with RolloutWriter)
plant three effects: the advantage's standard deviation falls from 2.0 to 0.5 along the
response, the teacher's margin over the student's candidates collapses at relative position
0.6, and the student/teacher top-K overlap drops from 15/16 to 1/2 there.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.diagnose_speed import synthetic_record
from diagnostics import reader
from diagnostics.lines import parse_line
from diagnostics.numbers import parse_array
from diagnostics.stats import Options
from diagnostics.topd import future_mean, low_divergence_share
from opdcli.cli import app
from opdcli.errors import RecordError
from opdcli.records import RolloutWriter, read_raw

BAD = Path(__file__).parent / "fixtures" / "rollouts_bad"
runner = CliRunner()


def write(path: Path, n: int, t: int = 160, k: int = 16, *, step: int = 0, steps: int = 1,
          seed: int = 0, **kwargs) -> Path:
    rng = np.random.default_rng(seed)
    with RolloutWriter(path) as writer:
        for i in range(n):
            writer.write(synthetic_record(rng, i, t, k, step=step + i * steps // n, **kwargs))
    return path


def diagnose(*args: str):
    result = runner.invoke(app, ["diagnose", *args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    a = write(root / "a.jsonl", 60, steps=2, seed=1)
    b = write(root / "b.jsonl", 30, t=400, step=2, seed=2)
    out = root / "diag"
    result = diagnose(str(a), str(b), "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def metrics(summary: dict, key: str) -> dict:
    return summary["analyses"][key]["metrics"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_planted_variance_decay(planted):
    out, summary = planted
    m = metrics(summary, "advantage")
    assert m["std(A) late / early (normalised)"] < 0.5
    assert summary["analyses"]["advantage"]["headline"]["adv_std_late_over_early"] < 0.5
    table = rows(out / "advantage_relative.csv")
    assert len(table) == 10 and float(table[0]["std_norm"]) == 1.0
    assert float(table[-1]["std_norm"]) < 0.5
    assert abs(m["A mean, all tokens"] - 0.3) < 0.1  # the mean stays non-zero late


def test_planted_margin_drop_is_released_near_the_plant(planted):
    out, summary = planted
    m = metrics(summary, "release")
    assert m["records analysed"] == 90
    assert m["acceptance rate"] >= 0.9
    assert abs(m["relative release position (accepted), mean"] - 0.6) < 0.05
    assert 0.5 < m["kept-token fraction"] < 0.7
    assert summary["analyses"]["release"]["example"]["accepted"] is True
    assert (out / "release_example.png").is_file()
    curve = list(csv.DictReader((out / "release_calibration.csv").open()))
    accept = {float(r["g_min"]): float(r["accept_rate"]) for r in curve}
    kept = [float(r["kept_fraction"]) for r in curve]
    assert accept[10.0] == pytest.approx(m["acceptance rate"])  # the curve agrees with the rule at g_min 10
    assert list(accept.values()) == sorted(accept.values(), reverse=True) and accept[0.0] >= accept[10.0]
    assert kept == sorted(kept) and kept[-1] <= 1.0
    assert metrics(summary, "margin")["margin late / early (normalised, last bin)"] < 0.2
    table = summary["analyses"]["margin"]["table"]
    assert [r["K"] for r in table] == [2, 4, 8, 16]
    assert all(r["late_over_early"] < 0.5 for r in table)


def test_planted_overlap_drop(planted):
    out, summary = planted
    position = rows(out / "prune_position.csv")
    assert float(position[0]["overlap_mean"]) == pytest.approx(15 / 16)
    assert float(position[-1]["overlap_mean"]) == pytest.approx(0.5)
    assert float(position[0]["drift_rate"]) == 0.0 and float(position[-1]["drift_rate"]) == 1.0
    # the planted teacher keeps the student's top-1 as its own top-1 throughout
    assert float(position[0]["top1_agreement"]) == 1.0 and float(position[-1]["top1_agreement"]) == 1.0
    m = metrics(summary, "prune")
    # 160 tokens: 64 drift events leave w > 0 everywhere; 400 tokens: w hits 0 after 100 events
    assert m["records with L_eff < T"] == pytest.approx(1 / 3)
    eff = {(int(r["tokens"]), int(r["eff_len"])) for r in rows(out / "prune_records.csv")}
    assert eff == {(160, 160), (400, 339)}  # events from token 240; the 100th (339) zeroes w


def test_steps_report_and_files(planted):
    out, summary = planted
    assert summary["steps"] == [0, 1, 2] and summary["records"] == 90
    assert set(summary["per_step"]) == {"0", "1", "2"}
    assert summary["analyses"]["steps"]["status"] == "ok"
    assert len(rows(out / "steps.csv")) == 3
    for section in summary["analyses"].values():
        for name in section["files"]:
            assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 9
    assert "http://" not in html and "https://" not in html and 'src="data:' in html
    assert "<img" in html and html.count("<img") == html.count('src="data:image/png;base64,')
    md = (out / "report.md").read_text()
    assert "![advantage](advantage.png)" in md and "## Release rule" in md
    topd = metrics(summary, "topd")
    assert 0.0 <= topd["share of high-loss tokens with low near-future divergence"] <= 1.0


def test_table_format_and_truncated_last_line(tmp_path):
    result = diagnose(str(BAD / "truncated_last_line.jsonl"), "--out", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "truncated_last_line.jsonl:3" in result.output
    assert "advantage" in result.output and "report.html" in result.output
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["records"] == 2 and len(summary["warnings"]) == 1


@pytest.mark.parametrize(("name", "needle"), [
    ("empty.jsonl", "empty.jsonl: no rollout records"),
    ("blank_lines_only.jsonl", "blank_lines_only.jsonl: no rollout records"),
    ("wrong_type.jsonl", "wrong_type.jsonl:2: field 'step': expected an int >= 0"),
    ("nan.jsonl", "nan.jsonl:2: field 'teacher_lp[2]': expected a finite number"),
    ("mismatched_lengths.jsonl", "mismatched_lengths.jsonl:2: field 'teacher_lp': expected length 4"),
    ("ragged_topk_row.jsonl", "ragged_topk_row.jsonl:2: field 'student_topk_ids[1]'"),
    ("binary_garbage.jsonl", "binary_garbage.jsonl:2: file is not UTF-8 text"),
    ("newer_schema.jsonl", "upgrade opd to read this file"),
])
def test_bad_files_exit_2_with_one_error_line(tmp_path, name, needle):
    result = diagnose(str(BAD / name), "--out", str(tmp_path / "d"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert not (tmp_path / "d" / "summary.json").exists()


@pytest.mark.parametrize("name", ["wrong_type.jsonl", "nan.jsonl", "mismatched_lengths.jsonl",
                                  "ragged_topk_row.jsonl", "binary_garbage.jsonl", "newer_schema.jsonl"])
def test_errors_match_read_raw(name):
    path = str(BAD / name)
    with pytest.raises(RecordError) as expected:
        list(read_raw(path))
    with pytest.raises(RecordError) as got:
        reader.collect([path], Options(), workers=1)
    assert str(got.value) == str(expected.value)


def test_missing_inputs_and_bad_options(tmp_path):
    good = str(BAD / "truncated_last_line.jsonl")
    for args, needle in [((str(tmp_path / "nope.jsonl"),), "rollouts file not found"),
                         ((good, "--bins", "0"), "--bins is 0"),
                         ((good, "--format", "xml"), "--format is 'xml'"),
                         ((good, "--out", good), "is a file")]:
        out = [] if "--out" in args else ["--out", str(tmp_path / "d")]
        result = diagnose(*args, *out)
        assert result.exit_code == 2 and needle in result.output, result.output


def test_records_without_topk_skip_analyses_with_notes(tmp_path):
    path = write(tmp_path / "plain.jsonl", 12, t=40, topk=False)
    result = diagnose(str(path), "--out", str(tmp_path / "d"), "--format", "json")
    assert result.exit_code == 0, result.output
    analyses = json.loads(result.stdout)["analyses"]
    for key in ("margin", "release", "prune", "topd"):
        assert analyses[key]["status"] == "skipped" and analyses[key]["notes"][0].startswith("skipped")
    assert analyses["advantage"]["status"] == "ok" and analyses["freshness"]["status"] == "ok"
    assert analyses["steps"]["status"] == "skipped"


def test_release_outputs_and_freshness_fields_are_used(tmp_path):
    rng = np.random.default_rng(3)
    with RolloutWriter(tmp_path / "r.jsonl") as writer:
        for i in range(10):
            rec = synthetic_record(rng, i, 50, 4, topk=False)
            rec["method"] = {"name": "release", "trajectory": {
                "release_segment": 5, "bic_improvement": 20.0 + i, "accepted": i < 8, "cut_token": 30}}
            rec["version_lag"], rec["freshness"] = i % 3, 0.5 + 0.05 * i
            writer.write(rec)
    summary = json.loads(diagnose(str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "d"),
                                  "--format", "json").stdout)
    release = summary["analyses"]["release"]
    assert release["status"] == "ok" and "10 records from method.trajectory" in release["notes"][0]
    assert release["metrics"]["acceptance rate"] == pytest.approx(0.8)
    assert release["metrics"]["relative release position (accepted), mean"] == pytest.approx(0.6)
    fresh = summary["analyses"]["freshness"]
    assert fresh["notes"] == [] and fresh["metrics"]["records with version_lag"] == 10


def test_parallel_chunks_match_serial_and_keep_line_numbers(tmp_path, monkeypatch):
    a = write(tmp_path / "a.jsonl", 40, t=60, k=4, seed=5)
    b = write(tmp_path / "b.jsonl", 20, t=30, k=4, step=3, seed=6)
    chunks = reader.plan([str(a)], chunk_bytes=10_000)
    data = a.read_bytes()
    assert len(chunks) > 3 and chunks[0].start == 0 and chunks[-1].end == len(data)
    assert all(data[c.start - 1:c.start] == b"\n" for c in chunks[1:])
    monkeypatch.setattr(reader, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(reader, "MIN_CHUNK_BYTES", 20_000)
    serial = reader.collect([a, b], Options(), workers=1)
    parallel = reader.collect([a, b], Options(), workers=2)
    assert parallel.records == serial.records == [40, 20] and parallel.steps == serial.steps
    for one, two in zip(serial.analyses, parallel.analyses, strict=True):
        assert one.step_metrics().keys() == two.step_metrics().keys()
        for step, values in one.step_metrics().items():
            assert values == pytest.approx(two.step_metrics()[step], nan_ok=True)
    lines = a.read_text().splitlines(keepends=True)
    lines[33] = lines[33].replace('"finished":true', '"finished":1')
    a.write_text("".join(lines))
    with pytest.raises(RecordError, match=r"a\.jsonl:34: field 'finished'"):
        reader.collect([a], Options(), workers=2)


def test_parse_array_against_json():
    valid = [b"[1e-05,-0.0,0,12.5,-3E+2,7.25e-3]", b"[0]", b"[-0.5]", b"[123456789012345]"]
    for text in valid:
        n = text.count(b",") + 1
        assert np.array_equal(parse_array(text, None, n, ints=False),
                              np.array(json.loads(text), dtype=float))
    invalid = [b"[01]", b"[1.]", b"[.5]", b"[+1]", b"[1e]", b"[- 1]", b"[1,,2]", b"[1 ]", b"[1.2.3]",
               b"[1e5.5]", b"[NaN]", b"[1e400]", b"[--1]", b"[-]", b"[1e+-2]", b"[0x1]", b"[1,2,]"]
    for text in invalid:
        assert parse_array(text, None, 2 if text == b"[1,2,]" else 1, ints=False) is None, text
    assert parse_array(b"[[1,2],[3,4]]", 2, 2, ints=True).tolist() == [1, 2, 3, 4]
    for text, rows in [(b"[[1,2],[3]]", 2), (b"[[1,2,3]]", 2), (b"[[1],[2],[3]]", 2), (b"[[1,2],3,4]", 2),
                       (b"[[1,-2],[3,4]]", 2), (b"[[1,2][3,4]]", 2), (b"[[1,2],[3,04]]", 2)]:
        assert parse_array(text, rows, 2, ints=True) is None, text


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(chars))
        choice = rng.choice('0123456789-.eE+,[]"{}: xn')
        op = rng.random()
        if op < 0.4:
            chars[i] = choice
        elif op < 0.7:
            del chars[i]
        else:
            chars.insert(i, choice)
    return "".join(chars)


def test_fast_line_parser_agrees_with_the_reference_reader(tmp_path):
    """Mutated records: the fast path accepts exactly what read_raw accepts, same errors."""
    rng, nrng = random.Random(0), np.random.default_rng(0)
    agree = 0
    for i in range(600):
        rec = synthetic_record(nrng, i, rng.randint(0, 5), rng.choice([1, 2, 3]), sentences=2,
                               topk=rng.random() < 0.8)
        text = json.dumps(rec, separators=(",", ":"))
        if rng.random() < 0.7:
            text = _mutate(rng, text)
        path = tmp_path / "one.jsonl"
        path.write_text(text + "\n")
        try:
            expected = [obj for _, obj in read_raw(path)]
            want = None
        except RecordError as exc:
            expected, want = [], str(exc)
        try:
            got = parse_line((text + "\n").encode(), (0, 0), lambda p=path: f"{p}:1", first=True)
            error = None
        except RecordError as exc:
            got, error = None, str(exc)
        assert error == want, text
        if got is not None and expected:
            assert np.array_equal(got.teacher_lp, np.asarray(expected[0]["teacher_lp"], dtype=float))
            if expected[0].get("topk"):
                assert np.array_equal(got.student_topk_lp.ravel(),
                                      np.asarray(expected[0]["student_topk_lp"], dtype=float).ravel())
            agree += 1
    assert agree > 100


def test_topd_share_and_future_window():
    assert future_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [2.5, 3.5, 4.0, 4.0]  # last: its own D
    loss = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 6.0])
    div = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    future = np.array([0.0] * 8 + [0.5, 3.0])  # token 8: high loss, calm future; token 9: divergent
    share = low_divergence_share({"loss": loss, "future": future, "div": div}, rho=0.2, delta=0.1)
    assert share["topd_high_loss"] == 2 and share["topd_low_div_share"] == 0.0  # 0.5 and 3.0 >= 0.1 nats
    assert share["topd_delta"] == 0.1
    assert share["topd_delta_median"] == 1.5 and share["topd_low_div_share_median"] == 0.5
    assert low_divergence_share({"loss": loss, "future": future, "div": div}, 0.2, 1.0)["topd_low_div_share"] == 0.5


def test_topd_divergence_covers_the_teachers_top_k_when_recorded():
    """With student_lp_on_teacher_topk the diagnostic's D is the method's union divergence."""
    import torch

    from diagnostics.topd import truncated_rkl
    from opdcli.methods.topd import topk_union_rkl

    g = torch.Generator().manual_seed(2)
    logp = torch.randn(6, 10, generator=g).log_softmax(-1)
    logq = (2 * torch.randn(6, 10, generator=g)).log_softmax(-1)
    s_lp, s_ids = logp.topk(3, dim=-1)
    t_lp, t_ids = logq.topk(3, dim=-1)
    t_on_s, s_on_t = logq.gather(-1, s_ids), logp.gather(-1, t_ids)
    want = topk_union_rkl(s_ids[None], s_lp[None], t_ids[None], t_lp[None], t_on_s[None], s_on_t[None])[0]
    rec = SimpleNamespace(student_topk_lp=s_lp.numpy(), student_topk_ids=s_ids.numpy(), teacher_topk_ids=t_ids.numpy(),
                          teacher_topk_lp=t_lp.numpy(), teacher_lp_on_student_topk=t_on_s.numpy(),
                          student_lp_on_teacher_topk=s_on_t.numpy(), memo={})
    assert np.allclose(truncated_rkl(rec, 3), want.numpy(), atol=1e-5)
    rec.student_lp_on_teacher_topk, rec.memo = None, {}
    alone = topk_union_rkl(s_ids[None], s_lp[None], s_ids[None], t_on_s[None], t_on_s[None], s_lp[None])[0]
    assert np.allclose(truncated_rkl(rec, 3), alone.numpy(), atol=1e-5)


def test_empty_responses_and_mixed_topk(tmp_path):
    rng = np.random.default_rng(4)
    with RolloutWriter(tmp_path / "mixed.jsonl") as writer:
        for i, (t, k) in enumerate([(0, 4), (30, 4), (30, 64), (25, 1), (0, 0), (40, 8)]):
            writer.write(synthetic_record(rng, i, t, k, topk=k > 0))
    result = diagnose(str(tmp_path / "mixed.jsonl"), "--out", str(tmp_path / "d"), "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["records"] == 6 and summary["topk"] == {"0": 1, "1": 1, "4": 2, "8": 1, "64": 1}
    margin = summary["analyses"]["margin"]
    assert [r["K"] for r in margin["table"]] == [2, 4, 8, 16, 32, 64]
    assert "2 records without teacher_lp_on_student_topk" in margin["notes"][0]


def test_top1_agreement_follows_the_teachers_own_favourite(tmp_path):
    """The teacher's top-1 is the argmax of its own log-probs, wherever it sits in the stored row."""
    rng = np.random.default_rng(4)
    with RolloutWriter(tmp_path / "r.jsonl") as writer:
        for i in range(8):
            rec = synthetic_record(rng, i, 40, 4)
            for row in rec["teacher_topk_lp"][20:]:  # late half: the teacher prefers column 3 (id + 1000)
                row[0], row[3] = row[3], row[0]
            writer.write(rec)
    diagnose(str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "d"), "--bins", "2")
    position = rows(tmp_path / "d" / "prune_position.csv")
    assert [float(r["top1_agreement"]) for r in position] == [1.0, 0.0]


def test_drift_calibration_separates_a_planted_incompatible_pair(tmp_path, capsys):
    """benchmarks.drift_calibration on two planted files: overlap stays at 15/16 on the
    compatible one and falls to 8/16 after 30% of the response on the incompatible one, so at
    K 16 the test o_t < 0.7 fires on no compatible token and on 70% of the incompatible ones,
    and L_eff follows Prune-OPD's own reliability (events after 1 / w_drop)."""
    from benchmarks.drift_calibration import main, rates

    assert rates([np.array([1.0, 0.5, 0.5, 1.0, 0.5])], 0.7, 0.5) == (0.6, 0.4)  # w = 1, .5, 0, 0, 0
    comp = write(tmp_path / "comp.jsonl", 8, t=200, drop=1.0)
    incomp = write(tmp_path / "incomp.jsonl", 8, t=200, drop=0.3, seed=3)
    main([str(comp), str(incomp), "--k", "4,16", "--theta", "0.7,0.9", "--w-drop", "0.01", "--out", str(tmp_path / "c")])
    table = {(int(r["k"]), float(r["theta"])): r for r in rows(tmp_path / "c" / "drift_calibration.csv")}
    row = table[(16, 0.7)]
    assert float(row["events_compatible"]) == 0.0 and abs(float(row["events_incompatible"]) - 0.7) < 1e-9
    # 140 late events: the 100th (token 159) ends the reliable prefix
    assert float(row["eff_frac_compatible"]) == 1.0 and float(row["eff_frac_incompatible"]) == 159 / 200
    assert (tmp_path / "c" / "drift_calibration.png").stat().st_size > 0
    assert "best test with compatible events <= 0.1" in capsys.readouterr().out
