"""What every analysis family hands to the report: headline rows, files written and notes.

An analysis family is a class with `add(rollout)`, `merge(other)`, `step_metrics()` (headline
numbers per training step) and `report(out_dir) -> Section`; `diagnostics.run` drives them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Section:
    """One analysis in the report.

    key: short name used in summary.json and file names. rows: (metric, value) headline
    numbers. files: CSV and PNG names written into the output folder (images are the PNGs).
    notes: why a part was skipped, approximations, counts of records left out. table: an
    optional small table (list of dicts) shown in the report. headline: the same numbers as
    `rows`, by machine-readable name (also the per-step metric names).
    """

    key: str
    title: str
    description: str
    rows: list[tuple[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    @property
    def images(self) -> list[str]:
        return [f for f in self.files if f.endswith(".png")]


def skipped(key: str, title: str, description: str, note: str) -> Section:
    """A section for an analysis that had no usable input."""
    return Section(key, title, description, notes=[note], skipped=True)


def clean(value: Any) -> Any:
    """JSON-safe scalar: numpy scalars become Python numbers, NaN and inf become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Write rows (dicts) as CSV with a header; returns the file name."""
    columns = columns or (list(rows[0]) if rows else [])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    return path.name


def _cell(value: Any) -> Any:
    value = clean(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is NaN."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b
