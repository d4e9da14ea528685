"""Metric sinks: metrics.jsonl always, tensorboard / wandb / trackio on request (train.tensorboard,
train.wandb, train.trackio: `opdcli.run.trackers`);
plus phase timers.

One JSON object per logged step with namespaced keys (`progress/step`, `optim/lr`,
`time/sample`, `loss/...`, `signal/...`, `method/<name>/...`, `eval/<bench>/...`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opdcli.errors import ConfigError
from opdcli.records.io import repair_jsonl_tail


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time in seconds to metrics[f"time/{key}"]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"time/{key}"] = metrics.get(f"time/{key}", 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Append metrics to run_dir/metrics.jsonl (flushed per line) and optionally tensorboard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, trackers: list[Any] | None = None) -> None:
        self.trackers = list(trackers or [])
        self.path = run_dir / "metrics.jsonl"
        repair_jsonl_tail(self.path, "metrics row")  # a killed run's half-written last row
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; skipping tensorboard logging "
                              "(pip install tensorboard)", stacklevel=2)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"progress/step": step}
        for key, value in metrics.items():
            v = float(value)
            row[key] = v if math.isfinite(v) else None
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in row.items():
                if value is not None and key != "progress/step":
                    self._tb.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, row)

    def sample(self, record: dict[str, Any]) -> None:
        """A rollout record just written: the trackers log it with the next metrics row."""
        for tracker in self.trackers:
            tracker.sample(record)

    def close(self) -> None:
        self._fh.close()
        for tracker in self.trackers:
            tracker.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl. A last line cut off mid-write (a killed run) is left out with a
    warning; any other malformed line raises ConfigError naming the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "pass the metrics.jsonl that opd train wrote") from None
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: left out a partial last line (a row cut off mid-write)", stacklevel=2)
                continue
            raise ConfigError(f"{path}:{i} is not a JSON object; the file is damaged: move the line aside "
                              "or pass the metrics.jsonl that opd train wrote") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{i} is not a JSON object; pass the metrics.jsonl that opd train wrote")
        rows.append(row)
    return rows
