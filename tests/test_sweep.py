"""opd sweep: plans every run up front, trains each, writes the comparison table."""

from __future__ import annotations

import pandas as pd
import pytest

from opdcli.errors import ConfigError
from opdcli.loops.sweep import load_sweep, run_sweep
from opdcli.loops.train import run_train


def test_sweep_writes_the_table(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(f"""
base: {tmp_path.parent.parent / 'x'}
out_dir: {tmp_path / 'out'}
seeds: [0, 1]
set: [train.max_steps=2, eval.size=8, rollout.prompts_per_step=2, train.rollouts_every=0]
methods:
  - name: opd
  - name: prefix
    options: {{length: 5}}
""".replace(str(tmp_path.parent.parent / "x"), str((__import__("pathlib").Path("configs/toy/opd.yaml")).resolve())))
    rows = run_sweep(f, ["test"], train=run_train)
    assert [(r["method"], r["seed"]) for r in rows] == [("opd", 0), ("opd", 1), ("prefix", 0), ("prefix", 1)]
    prefix = [r for r in rows if r["method"] == "prefix"]
    opd = [r for r in rows if r["method"] == "opd"]
    # prefix-OPD stops sampling at 5 tokens: 2 prompts x 1 sample x 2 steps x <= 5 tokens
    assert all(r["tokens_generated"] <= 20 for r in prefix)
    assert all(r["tokens_generated"] > 20 for r in opd)
    for name in ("sweep.csv", "sweep.md", "sweep.png", "sweep_runs.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert "| prefix | 2 |" in (tmp_path / "out" / "sweep.md").read_text()
    # --skip-done reuses every finished run whose config is unchanged and reruns the changed one
    first = {(r["method"], r["seed"]): r for r in rows}
    f.write_text(f.read_text().replace("options: {length: 5}", "options: {length: 4}"))
    seen = []
    again = run_sweep(f, ["test"], train=run_train, skip_done=True, echo=seen.append)
    reused = [s for s in seen if "reused" in s]
    assert len(reused) == 2 and all("opd seed" in s for s in reused)
    # the changed runs train again, each announced before and after, numbered out of the whole sweep
    assert [s.split(":")[0] for s in seen if "reused" not in s] == ["[3/4] prefix seed 0"] * 2 + ["[4/4] prefix seed 1"] * 2
    for r in again:
        if r["method"] == "opd":
            assert r == first[("opd", r["seed"])]
        else:
            assert r["tokens_generated"] <= 16 and r["wall_s"] != first[("prefix", r["seed"])]["wall_s"]


@pytest.mark.parametrize(("body", "match"), [
    ("base: x.yaml\n", "non-empty 'methods'"),
    ("base: x.yaml\nmethods: [opd, opd]\n", "labels must be unique"),
    ("base: x.yaml\nmethods: [{name: opd, option: {}}]\n", "Did you mean 'options'"),
])
def test_bad_sweep_files(tmp_path, body, match):
    f = tmp_path / "s.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_sweep(f)


def test_command_line_set_applies_to_every_run_and_refuses_per_run_keys(tmp_path):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from opdcli.cli import app

    f = tmp_path / "s.yaml"
    f.write_text(f"base: {Path('configs/toy/opd.yaml').resolve()}\nout_dir: {tmp_path / 'out'}\nseeds: [0]\n"
                 "set: [train.max_steps=3, eval.size=4, rollout.prompts_per_step=2, train.rollouts_every=0]\n"
                 "methods: [opd]\n")
    run_sweep(f, ["test"], train=run_train, extra=["train.max_steps=1"])
    lines = [json.loads(x) for x in (tmp_path / "out" / "opd-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["progress/step"] for r in lines if "loss/total" in r] == [1]
    for key in ("run.out_dir=x", "run.seed=3", "method.name=prune", "method.options.theta=0.5"):
        result = CliRunner().invoke(app, ["sweep", "--config", str(f), "--set", key])
        assert result.exit_code == 2 and "cannot apply to a sweep" in result.output
        assert "Traceback" not in result.output


def test_time_to_target_counts_training_time_up_to_the_first_crossing():
    """Hand-made metrics rows: evaluations at steps 2 and 4 (and after training); the target
    0.3 is first reached at step 4, after 4 steps of 1 + 0.5 s."""
    import math

    from opdcli.loops.sweep import aggregate, time_to_target

    rows = [{"progress/step": 0, "eval_before/heldout/accuracy": 0.1}]
    for step in range(1, 6):
        row = {"progress/step": step, "loss/total": 1.0, "time/sample": 1.0, "time/train": 0.5}
        if step in (2, 4):
            row["eval/heldout/accuracy"] = {2: 0.2, 4: 0.35}[step]
        rows.append(row)
    rows.append({"progress/step": 5, "eval_after/heldout/accuracy": 0.4})
    assert time_to_target(rows, 0.3) == (6.0, 4.0)
    assert time_to_target(rows, 0.38) == (7.5, 5.0)  # only the final evaluation reaches it
    assert time_to_target(rows, 0.05) == (0.0, 0.0)  # already there before training
    never = time_to_target(rows, 0.9)
    assert math.isnan(never[0]) and math.isnan(never[1])
    base = {"acc_before": 0.1, "acc_after": 0.4, "wall_s": 1, "train_s": 1, "tokens_generated": 1,
            "tokens_scored": 1, "tokens_trained": 1, "steps_to_target": 1.0}
    agg = aggregate([base | {"method": "a", "time_to_target_s": 6.0}, base | {"method": "a", "time_to_target_s": 8.0},
                     base | {"method": "a", "time_to_target_s": math.nan}])
    assert agg[0]["time_to_target_s"] == 7.0 and agg[0]["reached"] == 2


def test_sweep_reports_sampled_accuracy_and_time_to_target(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(f"""
base: {__import__("pathlib").Path("configs/toy/opd.yaml").resolve()}
out_dir: {tmp_path / 'out'}
seeds: [0]
target_accuracy: 0.01
set: [train.max_steps=2, eval.size=8, eval.every=1, eval.samples=2, rollout.prompts_per_step=2, train.rollouts_every=0]
methods: [opd]
""")
    rows = run_sweep(f, ["test"], train=run_train)
    assert 0.0 <= rows[0]["acc_after_sampled"] <= 1.0 and "time_to_target_s" in rows[0]
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "sampled acc after" in table and "time to target s (reached)" in table
    assert "(0/1)" in table or "(1/1)" in table
    curves = pd.read_csv(tmp_path / "out" / "sweep_curves.csv")
    assert list(curves["step"]) == [0, 1, 2] and curves["sampled_accuracy"].notna().all()
    assert curves["train_s"].is_monotonic_increasing and curves["train_s"].iloc[0] == 0
    assert (tmp_path / "out" / "sweep_curves.png").stat().st_size > 0
    # a reused run's row is summarised again under the sweep's current target (here: none)
    f.write_text(f.read_text().replace("target_accuracy: 0.01", "target_accuracy: null"))
    again = run_sweep(f, ["test"], train=run_train, skip_done=True)
    assert "time_to_target_s" not in again[0] and again[0]["acc_after"] == rows[0]["acc_after"]
    assert "time to target" not in (tmp_path / "out" / "sweep.md").read_text()
    f.write_text(f.read_text().replace("target_accuracy: null", "target_accuracy: 0.01"))
    with pytest.raises(ConfigError, match="target_accuracy is 30"):
        f.write_text(f.read_text().replace("target_accuracy: 0.01", "target_accuracy: 30"))
        load_sweep(f)


def test_mean_curve_averages_the_steps_every_seed_evaluated():
    """Two seeds' curves: step 2 only in the first is left out; mean and sample std per step."""
    from opdcli.run.curves import mean_curve, run_curve

    rows = [{"progress/step": 0, "eval_before/heldout/accuracy": 0.1, "eval_before/heldout_sampled/accuracy": 0.05}]
    rows += [{"progress/step": s, "loss/total": 1.0, "time/sample": 2.0, "time/score": 1.0, "rollout/tokens": 10 * s}
             for s in (1, 2, 3)]
    rows[2]["eval/heldout/accuracy"] = 0.2
    rows.append({"progress/step": 3, "eval_after/heldout/accuracy": 0.3})
    evals, steps = run_curve(rows)
    assert [(p["step"], p["train_s"], p["accuracy"]) for p in evals] == [(0, 0, 0.1), (2, 6, 0.2), (3, 9, 0.3)]
    assert evals[0]["sampled_accuracy"] == 0.05 and "sampled_accuracy" not in evals[1]
    assert [s["tokens_generated"] for s in steps] == [10, 20, 30]
    other = [{"step": 0.0, "train_s": 0.0, "accuracy": 0.3}, {"step": 3.0, "train_s": 5.0, "accuracy": 0.5}]
    got = [v for point in mean_curve([evals, other], "accuracy") for v in point]
    assert got == pytest.approx([0, 0, 0.2, 0.1414213562, 3, 7, 0.4, 0.1414213562])
