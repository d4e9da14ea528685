"""Data-parallel training: 2 torchrun ranks (gloo, CPU) equal one process on the same global batch.

Runs the real CLI: `opd train` for 5 toy steps alone and under `torchrun --nproc_per_node 2`,
then resumes the 2-rank run from its step-3 checkpoint on 2 ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMON = ["--config", str(ROOT / "configs/toy/opd.yaml"), "--set", "train.max_steps=5", "--set", "eval.size=8",
          "--set", "train.save_every=3", "--set", "run.threads=1", "--set", "run.overwrite=true",
          "--set", "train.rollouts_every=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], ranks: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    opd = str(BIN / "opd")
    cmd = [opd, "train", *args] if ranks == 1 else [
        str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), opd, "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["progress/step"]: r for r in rows if "loss/total" in r}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _run([*COMMON, "--set", f"run.out_dir={root / 'one'}"], 1)
    _run([*COMMON, "--set", f"run.out_dir={root / 'two'}"], 2)
    _run([*COMMON, "--set", f"run.out_dir={root / 'resumed'}", "--set",
          f"run.resume={root / 'two' / 'checkpoints' / 'step_3'}"], 2)
    return root


def test_two_ranks_match_one_process(runs):
    one, two = _metrics(runs / "one"), _metrics(runs / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        for key in ("loss/total", "loss/rkl", "signal/teacher_kl", "rollout/tokens", "train/tokens_trained"):
            assert abs(one[step][key] - two[step][key]) <= 1e-5, (step, key, one[step][key], two[step][key])
    evals = [{k: v for r in (run / "metrics.jsonl").read_text().splitlines()
              for k, v in json.loads(r).items() if k.startswith("eval_")} for run in (runs / "one", runs / "two")]
    assert evals[0].keys() == evals[1].keys() and "eval_after/heldout/response_len" in evals[0]
    assert all(abs(evals[0][k] - evals[1][k]) <= 1e-6 for k in evals[0]), evals  # ranks share the problems
    a, b = _weights(runs / "one/checkpoints/step_5"), _weights(runs / "two/checkpoints/step_5")
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    start = _weights(Path(ROOT / "opdcli/toy/weights/student"))
    assert max(float((start[k] - b[k]).abs().max()) for k in start) > 1e-3  # the student did move
    # the main rank alone wrote the records: one per sequence per step, stamped with its version
    records = [json.loads(line) for line in (runs / "two/rollouts.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 64 and {r["policy_version"] for r in records} == {0, 1, 2, 3, 4}


def test_two_rank_checkpoint_loads_and_resumes(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "two/checkpoints/step_5")
    w = _weights(runs / "two/checkpoints/step_5")
    assert torch.equal(model.model.embed_tokens.weight, w["model.embed_tokens.weight"])
    resumed = _weights(runs / "resumed/checkpoints/step_5")
    assert max(float((resumed[k] - w[k]).abs().max()) for k in w) <= 1e-6
    assert sorted(_metrics(runs / "resumed")) == [4, 5]


def test_a_lora_student_on_two_ranks_matches_one_process(tmp_path):
    """model.lora under torchrun + FSDP2: the same losses and the same saved adapter as one process."""
    from safetensors.torch import load_file

    pytest.importorskip("peft")
    args = ["--set", "train.max_steps=3", "--set", "rollout.prompts_per_step=4", "--set", "eval.enabled=false",
            "--set", "rollout.max_new_tokens=16", "--set", "model.lora.r=4", "--set", "model.lora.merge=true",
            "--set", "optim.lr=5e-3"]
    for name, ranks in (("one", 1), ("two", 2)):
        _run([*args, "--set", f"run.out_dir={tmp_path / name}"], ranks)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for step in (1, 2, 3):
        assert abs(one[step]["loss/total"] - two[step]["loss/total"]) <= 1e-5, step
    a, b = (load_file(str(tmp_path / n / "checkpoints/step_3/adapter_model.safetensors")) for n in ("one", "two"))
    assert sorted(a) == sorted(b) and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    m1, m2 = (load_file(str(tmp_path / n / "checkpoints/step_3/merged/model.safetensors")) for n in ("one", "two"))
    assert sorted(m1) == sorted(m2) and max(float((m1[k] - m2[k]).abs().max()) for k in m1) <= 1e-5
