"""Eval outputs: results.json, samples.jsonl, a rich table, and accuracy-vs-step CSV + PNG."""

from __future__ import annotations

import csv
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("opd", "torch", "transformers", "datasets", "math-verify", "lm-eval", "vllm")
CURVE_KEYS = ("avg@k", "avg@k_se", "pass@1", "no_answer_rate", "truncation_rate", "mean_output_tokens")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _clean(value: Any) -> Any:
    """NaN -> None so results.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_outputs(out_dir: Path, results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(_clean(results), indent=2, default=str) + "\n",
                                          encoding="utf-8")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for row in samples:
            fh.write(json.dumps(_clean(row), ensure_ascii=False, default=str) + "\n")


def _fmt(key: str, value: Any, se: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key.startswith(("avg@", "pass@", "maj@", "accuracy")) or key.endswith("rate"):
        text = f"{100 * value:.1f}%"
        return text + (f" ± {100 * se:.1f}" if isinstance(se, float) and not math.isnan(se) else "")
    return f"{value:.1f}"


def print_table(results: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = results.get("metrics", {})
    bench = results.get("bench", {})
    table = Table(title=f"opd eval {bench.get('name')} v{bench.get('version')}: {results.get('model') or '-'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key.endswith("_se") or key == "accuracy" or isinstance(value, dict):
            continue
        table.add_row(key, _fmt(key, value, metrics.get(f"{key}_se")))
    console = console or Console()
    console.print(table)


def write_curve(out_root: Path, rows: list[dict[str, Any]], bench: str) -> tuple[Path, Path]:
    """accuracy_vs_step.csv and .png under `out_root`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_root.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_root / "accuracy_vs_step.csv", out_root / "accuracy_vs_step.png"
    keys = ["step", "checkpoint", *CURVE_KEYS]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in keys})
    steps = [r["step"] for r in rows]
    acc = [r["avg@k"] for r in rows]
    se = [r.get("avg@k_se") if isinstance(r.get("avg@k_se"), float) and not math.isnan(r["avg@k_se"]) else 0.0
          for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(steps, acc, yerr=se, marker="o", capsize=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("avg@k (accuracy)")
    ax.set_title(f"{bench}: accuracy vs step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
