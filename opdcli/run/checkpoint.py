"""Checkpoints: `save_pretrained` weights + tokenizer, and the resumable trainer state.

Layout: run_dir/checkpoints/step_<N>/ holds config.json, model.safetensors, the tokenizer
files and trainer_state.pt (optimizer, RNG states, step, data position, method state).
run_dir/checkpoints/latest names the newest one. Any step_<N> folder loads with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opdcli.errors import CheckpointError
from opdcli.lora import lora_config, save_lora

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
                    keep: int, final: bool = False, weights: dict[str, torch.Tensor] | None = None,
                    merge: bool = False) -> Path:
    """Write checkpoints/step_N (main rank only), never losing a complete checkpoint.

    The new checkpoint is written in full under .tmp_step_N and only then moved into place; a
    complete step_N of the same step is set aside first and deleted after the move, and
    `latest` is replaced atomically. A failed write (disk full) removes the temporary folder
    and raises CheckpointError naming the folder and the newest complete checkpoint.

    Args:
        model: a transformers model (its config and, unless `weights` is given, its weights).
        optimizer_state: the full optimizer state (opdcli.learner.Learner.checkpoint_state).
        weights: a full state dict gathered from a sharded student, or None.
        merge: a LoRA student's checkpoint also holds its merged weights (model.lora.merge).
    """
    root = run_dir / "checkpoints"
    out = root / f"step_{state.step}"
    tmp = root / f".tmp_step_{state.step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_config(model) is not None:  # the adapter (and, on request, the merged model)
            save_lora(tmp, model, weights, merge)
            if merge:
                tokenizer.save_pretrained(tmp / "merged")
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save({"state": state.state_dict(), "optimizer": optimizer_state,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "final": final}, tmp / STATE_FILE)
        _fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = newest_complete(root)
        raise CheckpointError(
            f"cannot write checkpoint {out} ({_reason(exc)}); the newest complete checkpoint is "
            f"{last if last is not None else 'none'}; free space on {root} and resume with "
            f"--set run.resume={run_dir}") from None
    old = root / f".old_step_{state.step}"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)  # the complete copy stays on disk until the new one is in place
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    write_text_atomic(root / "latest", out.name + "\n")
    _prune(root, keep, protect=out)
    return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_complete(folder: Path) -> bool:
    """A checkpoint folder with its trainer state, and weights with their config (or a LoRA adapter)."""
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    adapter = (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    model = (folder / "config.json").is_file() and weights
    return folder.is_dir() and (folder / STATE_FILE).is_file() and (model or adapter)


def newest_complete(root: Path) -> Path | None:
    """The complete step_<N> folder under `root` with the largest N, or None."""
    steps = [p for p in root.glob("step_*") if p.name[5:].isdigit() and is_complete(p)]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def _prune(root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(path: str) -> Path:
    """Accept a step_<N> folder, a checkpoints/ folder or a run directory.

    A run's `latest` that is missing, empty or names an incomplete folder falls back, with a
    warning, to the newest complete step_<N>."""
    p = Path(path).expanduser()
    if is_complete(p):
        return p
    for root in (p, p / "checkpoints"):
        if not (root / "latest").exists() and not any(root.glob("step_*")):
            continue
        latest = root / "latest"
        named = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
        if named and is_complete(root / named):
            return root / named
        fallback = newest_complete(root)
        what = f"names {named}, which is missing or incomplete" if named else "is missing or empty"
        if fallback is not None:
            warnings.warn(f"{latest} {what}; resuming from the newest complete checkpoint {fallback}",
                          stacklevel=2)
            return fallback
        raise CheckpointError(f"--resume '{path}': {latest} {what}, and no complete step_<N> folder is there; "
                              "start a new run or pass a checkpoints/step_<N> folder written by opd train")
    raise CheckpointError(
        f"--resume '{path}' holds no checkpoint ({STATE_FILE} missing); pass a run directory "
        "or a checkpoints/step_<N> folder written by opd train"
    )


def load_trainer_state(ckpt: Path, load_optimizer) -> TrainState:
    """Restore RNG states and return the trainer state; `load_optimizer(state)` takes the optimizer's."""
    try:
        blob = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        if not isinstance(blob, dict) or not {"state", "optimizer", "torch_rng", "python_rng"} <= set(blob):
            raise ValueError("not a trainer state written by opd train")
    except Exception as exc:  # torch.load raises many kinds on a damaged file
        raise CheckpointError(f"{ckpt / STATE_FILE} is damaged ({_reason(exc)}); resume from another "
                              f"checkpoint of {ckpt.parent} (--set run.resume=<its step_N folder>)") from None
    load_optimizer(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    state = TrainState()
    state.load_state_dict(blob["state"])
    return state
