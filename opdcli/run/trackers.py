"""Experiment trackers beside metrics.jsonl: Weights & Biases (`train.wandb`) and trackio
(`train.trackio`), both optional extras (`pip install 'opd[tracking]'`).

Each gets the run's resolved config once, every logged metrics row at its step, and the
rollout samples written to rollouts.jsonl as a table (step, prompt, response, length,
correct, mean teacher-student log-prob gap). A resumed run continues the same tracker run:
its id is kept in the run directory (`trackers.json`). W&B honours WANDB_MODE=offline (the
run is synced later with `wandb sync`); trackio is local first (a SQLite file under
TRACKIO_DIR, ~/.cache/huggingface/trackio by default).

Typical use (opdcli.run.context does this):
    trackers = open_trackers(cfg, run_dir)
    for t in trackers: t.log(step, row)
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

from opdcli.config_io import to_dict
from opdcli.errors import ConfigError

SAMPLE_COLUMNS = ["step", "sample_id", "prompt", "response", "length", "correct", "teacher_minus_student_lp"]


def sample_row(record: dict[str, Any]) -> list[Any]:
    """One rollouts.jsonl record as a row of the samples table."""
    n = len(record.get("teacher_lp") or [])
    gap = sum(t - s for t, s in zip(record["teacher_lp"], record["student_lp"], strict=True)) / n if n else 0.0
    return [record["step"], record["sample_id"], record["prompt"], record["response_text"], n,
            record.get("correct"), gap]


def _run_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / "trackers.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _keep_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _run_ids(run_dir) | {name: run_id}
    (run_dir / "trackers.json").write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


def _need(module: str, flag: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag}=true needs the {module} package: pip install 'opd[tracking]' "
                          f"(or pip install {module}), or set {flag}=false")


class _Tracker:
    """Buffers the samples written since the last metrics row and logs them with it."""

    name = ""

    def __init__(self) -> None:
        self.pending: list[list[Any]] = []

    def sample(self, record: dict[str, Any]) -> None:
        self.pending.append(sample_row(record))

    def log(self, step: int, row: dict[str, float | None]) -> None:
        values = {k: v for k, v in row.items() if v is not None and k != "progress/step"}
        if self.pending:
            values["rollouts/samples"] = self._table(self.pending)
            self.pending = []
        self._log(step, values)

    def _table(self, rows: list[list[Any]]) -> Any:
        raise NotImplementedError

    def _log(self, step: int, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(_Tracker):
    name = "wandb"

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        super().__init__()
        import wandb

        self.wandb = wandb
        run_id = _run_ids(run_dir).get(self.name) or uuid.uuid4().hex[:16]
        self.run = wandb.init(project=cfg.train.tracking_project, name=cfg.train.tracking_name or run_dir.name,
                              id=run_id, resume="allow", dir=str(run_dir), config=to_dict(cfg),
                              tags=[cfg.method.name])
        _keep_id(run_dir, self.name, run_id)

    def _table(self, rows: list[list[Any]]) -> Any:
        return self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows)

    def _log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(_Tracker):
    name = "trackio"

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        super().__init__()
        import trackio

        self.trackio = trackio
        name = _run_ids(run_dir).get(self.name) or f"{cfg.train.tracking_name or run_dir.name}-{uuid.uuid4().hex[:6]}"
        self.run = trackio.init(project=cfg.train.tracking_project, name=name, config=to_dict(cfg),
                                resume="allow")
        _keep_id(run_dir, self.name, name)

    def _table(self, rows: list[list[Any]]) -> Any:
        import pandas as pd

        return self.trackio.Table(dataframe=pd.DataFrame(rows, columns=SAMPLE_COLUMNS))

    def _log(self, step: int, values: dict[str, Any]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


def check_trackers(train: Any) -> None:
    """Refuse, at config time, a tracker whose package is missing (the flag could not take effect)."""
    if train.wandb:
        _need("wandb", "train.wandb")
    if train.trackio:
        _need("trackio", "train.trackio")


def open_trackers(cfg: Any, run_dir: Path) -> list[_Tracker]:
    """The trackers `cfg.train` asks for, each started (or resumed) on this run directory."""
    check_trackers(cfg.train)
    out: list[_Tracker] = []
    if cfg.train.wandb:
        out.append(WandbTracker(cfg, run_dir))
    if cfg.train.trackio:
        out.append(TrackioTracker(cfg, run_dir))
    return out
