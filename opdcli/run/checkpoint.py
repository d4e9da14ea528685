"""Checkpoints: `save_pretrained` weights + tokenizer, and the resumable trainer state.

Layout: run_dir/checkpoints/step_<N>/ holds config.json, model.safetensors, the tokenizer
files and trainer_state.pt (optimizer, RNG states, step, data position, method state).
run_dir/checkpoints/latest names the newest one. Any step_<N> folder loads with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdcli.errors import CheckpointError

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainState:
    """Everything besides the weights that a resumed run needs."""

    step: int = 0
    prompt_position: int = 0
    method: dict[str, Any] = field(default_factory=dict)
    generator: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "prompt_position": self.prompt_position, "method": self.method,
                "generator": self.generator}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.prompt_position = int(state["prompt_position"])
        self.method = dict(state["method"])
        self.generator = state["generator"]


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer_state: dict[str, Any], state: TrainState,
                    keep: int, final: bool = False, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step_N (main rank only).

    Args:
        model: a transformers model (its config and, unless `weights` is given, its weights).
        optimizer_state: the full optimizer state (opdcli.learner.Learner.checkpoint_state).
        weights: a full state dict gathered from a sharded student, or None.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"step_{state.step}"
    tmp = root / f".tmp_step_{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save({"state": state.state_dict(), "optimizer": optimizer_state,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "final": final}, tmp / STATE_FILE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a crash mid-save never leaves a half-written step_<N>
    (root / "latest").write_text(out.name + "\n", encoding="utf-8")
    _prune(root, keep, protect=out)
    return out


def _prune(root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(path: str) -> Path:
    """Accept a step_<N> folder, a checkpoints/ folder or a run directory."""
    p = Path(path).expanduser()
    for candidate in (p, p / "checkpoints"):
        latest = candidate / "latest"
        if latest.is_file():
            p = candidate / latest.read_text(encoding="utf-8").strip()
            break
    if not (p / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume '{path}' holds no checkpoint ({STATE_FILE} missing); pass a run directory "
            "or a checkpoints/step_<N> folder written by opd train"
        )
    return p


def load_trainer_state(ckpt: Path, load_optimizer) -> TrainState:
    """Restore RNG states and return the trainer state; `load_optimizer(state)` takes the optimizer's."""
    blob = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    load_optimizer(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    state = TrainState()
    state.load_state_dict(blob["state"])
    return state
