"""train.wandb and train.trackio, offline: the run's config, every metrics row at its step and the
rollout samples as a table reach the tracker; a resumed run continues the same tracker run; a
tracker whose package is missing is refused before any model loads."""

from __future__ import annotations

import glob
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from opdcli import config as C
from opdcli.errors import ConfigError

BASE = ["train.max_steps=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "eval.enabled=false",
        "train.rollouts_every=1", "rollout.max_new_tokens=12", "train.save_every=1"]


def _train(out: Path, *extra: str):
    from opdcli.loops.train import run_train

    cfg, explicit = C.load_config(C.TrainRunConfig, None, [f"run.out_dir={out}", *BASE, *extra])
    return run_train(cfg, explicit, argv=["test"])


def test_wandb_offline_gets_config_metrics_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _train(out, "train.wandb=true", "train.tracking_project=opd-test")
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    (run,) = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))
    history = Path(run, f"run-{run_id}.wandb").read_bytes()
    for key in (b"loss/total", b"signal/teacher_kl", b"optim/lr", b"rollouts/samples", b"opd-test"):
        assert key in history, key
    tables = sorted(Path(run, "files", "media", "table").rglob("*.table.json"))
    assert len(tables) == 2  # one per step (rollouts_every 1)
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "sample_id", "prompt", "response"]
    assert len(table["data"]) == 4 and table["data"][0][2].startswith("<|im_start|>")
    # a resumed run continues the same wandb run id
    _train(out, "train.wandb=true", "train.tracking_project=opd-test", "train.max_steps=3",
           f"run.resume={out / 'checkpoints' / 'step_2'}")
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2


def test_trackio_locally_gets_config_metrics_and_samples(tmp_path):
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    # trackio reads TRACKIO_DIR when it is imported: a fresh process
    args = [f"--set={kv}" for kv in [f"run.out_dir={out}", *BASE, "train.trackio=true",
                                     "train.tracking_project=opd-test"]]
    proc = subprocess.run([sys.executable, "-c", "from opdcli.cli import main; main()", "train", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "trackio" / "opd-test.db")
    rows = db.execute("select step, metrics from metrics order by step").fetchall()
    by_step = {step: json.loads(blob) for step, blob in rows}
    assert {1, 2} <= set(by_step)
    assert all("loss/total" in by_step[s] and "rollouts/samples" in by_step[s] for s in (1, 2))
    samples = by_step[1]["rollouts/samples"]
    assert samples["_type"] == "trackio.table" and len(samples["_value"]) == 4
    (config,) = db.execute("select config from configs").fetchall()
    assert json.loads(config[0])["method"]["name"] == "opd"


@pytest.mark.parametrize("flag,module", [("train.wandb", "wandb"), ("train.trackio", "trackio")])
def test_a_tracker_without_its_package_is_refused_before_models_load(tmp_path, monkeypatch, flag, module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError, match=rf"{flag}=true needs the {module} package: pip install 'opd\[tracking\]'"):
        _train(tmp_path / "run", f"{flag}=true")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
