"""The asynchronous loop on 2 local Ray workers (toy pair, a few steps): lags occur, freshness
weights and drops behave as configured, the student moves, and no Ray process is left behind."""

from __future__ import annotations

import json
import os
import signal
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
    rows = _train(tmp_path / "fopd", "method.name=fopd", "train.max_steps=5", "method.options.f_min=0.6",
                  "asynchronous.worker_scoring=true")
    steps = [r for r in rows if "loss/total" in r]
    assert len(steps) == 5
    assert steps[0]["async/lag_max"] == 0 and max(r["async/lag_max"] for r in steps) >= 2  # lags occur
    for r in steps:  # lag 0 is fresh; lagged batches have drifted and are weighed down or dropped
        if r["async/lag_max"] == 0:
            assert r["method/fopd/freshness_mean"] > 0.99
    lagged = [r for r in steps if r["async/lag_max"] >= 2]
    assert all(r["method/fopd/freshness_mean"] < 0.99 for r in lagged)
    # the workers' own teacher scores: no supervision drift at lag 0, some once the student moved
    assert all(r["method/fopd/d_sup_mean"] < 1e-4 for r in steps if r["async/lag_max"] == 0)
    assert all(r["method/fopd/d_sup_mean"] > 1e-3 for r in lagged)
    assert any(r["method/fopd/dropped_frac"] > 0 for r in lagged)  # f_min 0.6 drops the stalest rows
    records = [json.loads(line) for line in (tmp_path / "fopd/rollouts.jsonl").read_text().splitlines()]
    assert {r["version_lag"] for r in records} >= {0, 2} and all(0 <= r["freshness"] <= 1 for r in records)
    diag = subprocess.run([OPD, "diagnose", str(tmp_path / "fopd/rollouts.jsonl"), "--out", str(tmp_path / "diag"),
                           "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert diag.returncode == 0, diag.stderr[-2000:]
    fresh = json.loads(diag.stdout)["analyses"]["freshness"]
    assert fresh["status"] == "ok" and fresh["metrics"]["records with version_lag"] == len(records)
    assert (tmp_path / "diag/freshness.png").exists() and (tmp_path / "diag/freshness.csv").exists()
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
    with pytest.raises(ConfigError, match="ray rollout engine cannot do; set train.mode=sync"):
        check_sampler(RayWorkerPool, online)


def _wait_for_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "exited early"
        if path.exists() and sum('"loss/total"' in line for line in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{n} steps did not appear in {path}")


def _no_ray_left(timeout: float = 30) -> None:
    import time

    end = time.monotonic() + timeout
    while _ray_processes() and time.monotonic() < end:
        time.sleep(0.5)
    assert _ray_processes() == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_drains_the_workers_and_leaves_a_checkpoint_to_resume(signum, tmp_path):
    out = tmp_path / "run"
    args = [OPD, "train", "--config", str(ROOT / "configs/toy/opd.yaml"), "--method", "fopd",
            "--set", "train.mode=async", "--set", "asynchronous.workers=2", "--set", "eval.size=8",
            "--set", "train.max_steps=500", "--set", f"run.out_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out / "metrics.jsonl", 3, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err
    _no_ray_left()
    ckpts = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert ckpts, "no checkpoint after the interrupt"
    step = int(ckpts[-1].name.split("_")[1])
    assert step >= 3
    if signum != signal.SIGINT:
        return
    # resume in async mode from the checkpoint the interrupt left: the step count continues
    resumed = _train(tmp_path / "resumed", "method.name=fopd", f"run.resume={ckpts[-1]}",
                     f"train.max_steps={step + 2}")
    steps = [r["progress/step"] for r in resumed if "loss/total" in r]
    assert steps == [step + 1, step + 2]  # progress/step counts steps done
    _no_ray_left()


def test_a_dead_worker_is_restarted_and_its_batch_resampled():
    from opdcli.engines.ray_workers import RayWorkerPool
    from opdcli.engines.types import SamplingParams
    from opdcli.errors import OpdError
    from opdcli.loops.train_async import _collect

    student = str(ROOT / "opdcli/toy/weights/student")
    pool = RayWorkerPool(1, student, "cpu", "float32", 0, 1)
    try:
        from collections import deque

        from transformers import AutoModelForCausalLM

        pool.publish(AutoModelForCausalLM.from_pretrained(student).state_dict(), 0)
        params = SamplingParams(n=2, max_new_tokens=5)
        prompts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"]

        def send(worker, p):
            return pool.submit(worker, p, params, None)

        pool.ray.kill(pool.workers[0], no_restart=True)  # the process dies with a batch in flight
        rollout, _, worker, got = _collect(pool, deque([(send(0, prompts), 0, prompts)]), send, max_restarts=1)
        assert worker == 0 and got == prompts and rollout.batch_size == 2
        assert pool.restarts == [1] and rollout.version_B.tolist() == [0, 0]
        pool.ray.kill(pool.workers[0], no_restart=True)  # again: the one restart allowed is spent
        with pytest.raises(OpdError, match=r"rollout worker 0 died \(.*\) after 1 restart"):
            _collect(pool, deque([(send(0, prompts), 0, prompts)]), send, max_restarts=1)
    finally:
        pool.close()
    _no_ray_left()


def test_workers_asking_for_gpus_the_cluster_lacks_are_refused():
    """Ray would keep such actors pending forever; the pool says why instead."""
    from opdcli.engines.ray_workers import RayWorkerPool
    from opdcli.errors import ConfigError

    student = str(ROOT / "opdcli/toy/weights/student")
    with pytest.raises(ConfigError, match=r"worker_gpus=1 asks Ray for 2 GPUs for 2 workers and the cluster has 0"):
        RayWorkerPool(2, student, "cpu", "float32", 0, 1, gpus=1)
