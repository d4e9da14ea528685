"""The asynchronous loop on 2 local Ray workers (toy pair, a few steps): lags occur, freshness
weights and drops behave as configured, the student moves, and no Ray process is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPD = str(Path(sys.executable).parent / "opd")
pytest.importorskip("ray")


def _ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def _train(out: Path, *sets: str) -> list[dict]:
    args = [OPD, "train", "--config", str(ROOT / "configs/toy/opd.yaml"), "--set", "train.mode=async",
            "--set", "asynchronous.workers=2", "--set", "asynchronous.buffer=3", "--set", "eval.size=8",
            "--set", "train.rollouts_every=1", "--set", f"run.out_dir={out}", "--set", "run.overwrite=true"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fopd_weighs_stale_samples_down(tmp_path):
    rows = _train(tmp_path / "fopd", "method.name=fopd", "train.max_steps=5", "method.options.f_min=0.6")
    steps = [r for r in rows if "loss/total" in r]
    assert len(steps) == 5
    assert steps[0]["async/lag_max"] == 0 and max(r["async/lag_max"] for r in steps) >= 2  # lags occur
    for r in steps:  # lag 0 is fresh; lagged batches have drifted and are weighed down or dropped
        if r["async/lag_max"] == 0:
            assert r["method/fopd/freshness_mean"] > 0.99
    lagged = [r for r in steps if r["async/lag_max"] >= 2]
    assert all(r["method/fopd/freshness_mean"] < 0.99 for r in lagged)
    assert any(r["method/fopd/dropped_frac"] > 0 for r in lagged)  # f_min 0.6 drops the stalest rows
    records = [json.loads(line) for line in (tmp_path / "fopd/rollouts.jsonl").read_text().splitlines()]
    assert {r["version_lag"] for r in records} >= {0, 2} and all(0 <= r["freshness"] <= 1 for r in records)
    from safetensors.torch import load_file

    start = load_file(ROOT / "opdcli/toy/weights/student/model.safetensors")
    end = load_file(tmp_path / "fopd/checkpoints/step_5/model.safetensors")
    assert max(float((start[k] - end[k]).abs().max()) for k in start) > 1e-3
    assert _ray_processes() == []


def test_async_without_control_drops_rows_over_max_lag(tmp_path):
    rows = _train(tmp_path / "plain", "method.name=opd", "train.max_steps=4", "asynchronous.max_lag=1")
    steps = [r for r in rows if "async/lag_max" in r]
    dropped = [r for r in steps if r["async/lag_max"] > 1]
    assert dropped and all(r["async/dropped_stale_frac"] == 1.0 for r in dropped)
    assert all(r["async/dropped_stale_frac"] == 0.0 for r in steps if r["async/lag_max"] <= 1)
    assert _ray_processes() == []


def test_async_refusals():
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.errors import ConfigError
    from opdcli.validate import validate_train_config

    cfg, explicit = load_config(TrainRunConfig, None, ["asynchronous.workers=3"])
    with pytest.raises(ConfigError, match="asynchronous.workers cannot take effect: train.mode=sync"):
        validate_train_config(cfg, explicit)
    from opdcli.engines.ray_workers import RayWorkerPool
    from opdcli.methods import build_method
    from opdcli.validate import check_sampler

    online = build_method("prune", {"online": True}, cfg.loss)
    with pytest.raises(ConfigError, match="ray-hf rollout engine cannot do"):
        check_sampler(RayWorkerPool, online)
