"""benchmarks.heldout: a config's held-out evaluation run afterwards gives the numbers training
logged for the same model (greedy and sampled), and a wrong model path is one line."""

from __future__ import annotations

import csv

import pytest

from benchmarks.heldout import main
from opdcli import config as C
from opdcli.run.tracking import read_metrics

SETS = ["eval.size=12", "eval.samples=2", "rollout.max_new_tokens=40"]


def test_heldout_benchmark_matches_the_training_evaluation(tmp_path, capsys):
    from opdcli.loops.train import run_train

    cfg, explicit = C.load_config(C.TrainRunConfig, "configs/toy/opd.yaml",
                                  [f"run.out_dir={tmp_path / 'run'}", "train.max_steps=1", "rollout.prompts_per_step=2",
                                   "train.rollouts_every=0", *SETS])
    run_train(cfg, explicit, argv=["test"])
    before = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_before/heldout/accuracy" in r)
    args = ["toy:student", "--config", "configs/toy/opd.yaml", "--samples", "2", "--out", str(tmp_path / "b")]
    main(args + [a for s in SETS for a in ("--set", s)])
    row = next(csv.DictReader((tmp_path / "b" / "heldout.csv").open()))
    assert int(row["problems"]) == 12
    for key in ("accuracy", "response_len", "truncated_rate"):
        assert float(row[f"greedy/{key}"]) == pytest.approx(before[f"eval_before/heldout/{key}"])
        assert float(row[f"sampled/{key}"]) == pytest.approx(before[f"eval_before/heldout_sampled/{key}"])
    assert "model=toy:student" in capsys.readouterr().out


def test_heldout_benchmark_names_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="error: model path '.*nowhere' does not exist"):
        main([str(tmp_path / "nowhere"), "--config", "configs/toy/opd.yaml", "--out", str(tmp_path / "b")])


def test_heldout_benchmark_sampled_only(tmp_path):
    main(["toy:student", "--config", "configs/toy/opd.yaml", "--samples", "2", "--no-greedy", "--set", "eval.size=4",
          "--set", "rollout.max_new_tokens=16", "--out", str(tmp_path)])
    row = next(csv.DictReader((tmp_path / "heldout.csv").open()))
    assert "sampled/accuracy" in row and not any(k.startswith("greedy/") for k in row)
    with pytest.raises(SystemExit):
        main(["toy:student", "--config", "configs/toy/opd.yaml", "--no-greedy", "--out", str(tmp_path)])
