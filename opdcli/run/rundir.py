"""A run directory that loses nothing: one writer at a time, resumes that cut the records back to
the checkpoint, and config changes on resume that are refused unless asked for (and recorded).

- `lock_run_dir`: an exclusive `flock` on run_dir/.opd.lock, held while the process lives; a
  second writer (another `opd train` into the same run.out_dir, overwrite or not) is refused.
- `cut_to_step`: on resume, metrics.jsonl keeps the rows of steps <= the checkpoint's step and
  rollouts.jsonl the records of steps before it; what is cut goes to metrics.cut.jsonl /
  rollouts.cut.jsonl beside them (appended), so nothing is lost and nothing counts twice.
- `config_changes`: the resolved config against the one the checkpoint's run wrote.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import yaml

from opdcli.config_io import to_dict
from opdcli.errors import ConfigError

LOCK = ".opd.lock"
FREE_TO_CHANGE = ("run.resume", "run.overwrite", "run.out_dir", "run.threads", "run.allow_config_change",
                  "run.device", "run.ray_address", "train.max_steps", "train.save_every", "train.keep_checkpoints",
                  "train.rollouts_every", "train.rollouts_topk", "train.tensorboard", "train.wandb", "train.trackio", "train.tracking_",
                  "eval.",
                  "asynchronous.workers", "asynchronous.buffer", "asynchronous.worker_threads",
                  "asynchronous.worker_gpus", "asynchronous.max_restarts", "scoring.batch_size",
                  "scoring.chunk_tokens", "rollout.batch_size")
"""Keys (or prefixes) a resumed run may change without asking: how long it runs, how it logs,
and the resources it runs on (devices, workers, batch sizes that only split the same work)."""


def lock_run_dir(run_dir: Path) -> int:
    """Hold the run directory's lock (the returned descriptor; closing it releases the lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"run directory '{run_dir}' is in use by another opd process (pid {holder}); wait "
                          "for it to finish or pick another run.out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "options":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(previous: Path, cfg: Any) -> dict[str, list[Any]]:
    """{key: [before, now]} for every key that differs from the config.yaml at `previous` and is
    not free to change on resume (FREE_TO_CHANGE); {} when there is no such file."""
    if not previous.is_file():
        return {}
    try:
        before = _flat(yaml.safe_load(previous.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{previous} is damaged ({type(exc).__name__}); restore it, or resume into a "
                          "new run.out_dir") from None
    now = _flat(to_dict(cfg))
    free = FREE_TO_CHANGE
    keys = sorted(set(before) | set(now))
    return {k: [before.get(k), now.get(k)] for k in keys
            if before.get(k) != now.get(k) and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)}


def check_resume_config(previous: Path, cfg: Any, run_dir: Path, step: int) -> dict[str, list[Any]]:
    """Refuse a resume whose config differs from its run's (beyond FREE_TO_CHANGE) unless
    run.allow_config_change is set; then the changes are appended to config_changes.jsonl."""
    changes = config_changes(previous, cfg)
    if not changes:
        return {}
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
    more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
    if not cfg.run.allow_config_change:
        raise ConfigError(f"resuming with a different config: {shown}{more}; drop those overrides, or pass "
                          "--set run.allow_config_change=true to continue with them (recorded in the run)")
    with open(run_dir / "config_changes.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "from": str(previous), "changes": changes}, default=str) + "\n")
    return changes


def _cut_file(path: Path, keep) -> int:
    """Move the lines for which keep(row) is false (and any unreadable line) to <name>.cut.jsonl."""
    if not path.is_file():
        return 0
    kept, cut = [], []
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                row = json.loads(raw)
                ok = isinstance(row, dict) and keep(row)
            except ValueError:
                ok = False  # a line cut off mid-write by the kill
            (kept if ok else cut).append(raw if raw.endswith(b"\n") else raw + b"\n")
    if not cut:
        return 0
    side = path.with_name(path.stem + ".cut.jsonl")
    with open(side, "ab") as fh:
        fh.writelines(cut)
        fh.flush()
        os.fsync(fh.fileno())
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.writelines(kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(cut)


def cut_to_step(run_dir: Path, step: int) -> tuple[int, int]:
    """Cut metrics.jsonl back to rows of steps <= `step` and rollouts.jsonl to records of steps
    < `step` (the checkpoint holds `step` finished steps). Returns the counts cut."""
    metrics = _cut_file(run_dir / "metrics.jsonl", lambda r: r.get("progress/step", 0) <= step)
    rollouts = _cut_file(run_dir / "rollouts.jsonl", lambda r: int(r.get("step", 0)) < step)
    return metrics, rollouts
