"""`opd diagnose`: the teachability analyses of one or more rollouts.jsonl files.

    opd diagnose runs/toy-opd/rollouts.jsonl --out runs/toy-opd/diagnose
    opd diagnose a.jsonl b.jsonl --out diag --format json --bins 20

Every record is validated while the files stream through the accumulators
(`diagnostics.reader`); then each analysis writes its CSVs and PNGs, and the output folder gets
report.md, a self-contained report.html and summary.json. Analyses whose inputs are missing
(no top-K data, no freshness fields, a single step) are skipped with a note.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from diagnostics.reader import collect
from diagnostics.release import as_dict
from diagnostics.report import fmt, write_html, write_markdown
from diagnostics.section import Section, clean
from diagnostics.stats import Options
from diagnostics.steps import steps_section
from opdcli.errors import ConfigError

FORMATS = ("table", "json", "none")


def _check(paths: list, out_dir: Path, bins: int, fmt_: str) -> None:
    if fmt_ not in FORMATS:
        raise ConfigError(f"--format is '{fmt_}'; choose table or json")
    if not 1 <= bins <= 1000:
        raise ConfigError(f"--bins is {bins}; it must be between 1 and 1000")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file; pass a folder for the report")
    resolved = {Path(p).resolve() for p in paths}
    if out_dir.resolve() in resolved:
        raise ConfigError(f"--out '{out_dir}' is one of the input files; pass a folder")


def run_diagnose(paths: list[str | Path], out_dir: str | Path, bins: int = 10,
                 fmt: str = "table", *, workers: int | None = None) -> dict[str, Any]:
    """Validate, analyse and report; returns the summary (also written to summary.json).

    Args:
        paths: rollouts.jsonl files, analysed together.
        out_dir: output folder (created; existing report files are overwritten).
        bins: relative-position bins.
        fmt: "table" prints a summary table, "json" prints summary.json to stdout (nothing
            else goes to stdout), "none" prints nothing.
        workers: worker processes for large inputs (default: CPU count, at most 8).
    Raises:
        RecordError: a malformed record (file:line and field) or a file without records.
        ConfigError: bad options.
    """
    out = Path(out_dir)
    _check(paths, out, bins, fmt)
    started = time.perf_counter()
    col = collect(paths, Options(bins=bins), workers)
    out.mkdir(parents=True, exist_ok=True)
    sections = [analysis.report(out) for analysis in col.analyses]
    step_sec, per_step = steps_section(col.analyses, col.steps, out)
    sections.append(step_sec)
    summary = _summary(col, paths, out, bins, sections, per_step)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n",
                                      encoding="utf-8")
    write_markdown(out / "report.md", summary, sections)
    write_html(out / "report.html", summary, sections)
    for warning in col.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if fmt == "json":
        sys.stdout.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    elif fmt == "table":
        print_table(summary, sections)
    return summary


def _summary(col, paths: list, out: Path, bins: int, sections: list[Section],
             per_step: dict[int, dict[str, float]]) -> dict[str, Any]:
    release = next(a for a in col.analyses if a.key == "release")
    analyses = {}
    for sec in sections:
        analyses[sec.key] = {
            "title": sec.title, "status": "skipped" if sec.skipped else "ok", "notes": sec.notes,
            "files": sec.files, "metrics": {m: clean(v) for m, v in sec.rows},
            "headline": {m: clean(v) for m, v in sec.headline.items()},
        }
        if sec.table:
            analyses[sec.key]["table"] = [{k: clean(v) for k, v in row.items()} for row in sec.table]
    analyses["release"]["example"] = as_dict(release.example or release.fallback)
    return {
        "command": "opd diagnose",
        "files": [{"path": str(p), "records": n, "tokens": t}
                  for p, n, t in zip(paths, col.records, col.tokens, strict=True)],
        "records": sum(col.records), "tokens": sum(col.tokens), "steps": sorted(col.steps),
        "topk": {str(k): n for k, n in sorted(col.topk.items())}, "bins": bins,
        "out_dir": str(out), "warnings": list(col.warnings),
        "rows": [{"analysis": sec.key, "metric": m, "value": clean(v)} for sec in sections for m, v in sec.rows],
        "analyses": analyses,
        "per_step": {str(s): {k: clean(v) for k, v in m.items()} for s, m in per_step.items()},
    }


def print_table(summary: dict[str, Any], sections: list[Section]) -> None:
    """The headline rows as a rich table on stdout, then notes and the output folder."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"opd diagnose: {summary['records']} records, {summary['tokens']} tokens")
    table.add_column("analysis", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for sec in sections:
        if sec.skipped:
            table.add_row(sec.key, f"[dim]{sec.notes[0]}[/dim]", "-")
            continue
        for i, (metric, value) in enumerate(sec.rows):
            table.add_row(sec.key if i == 0 else "", metric, fmt(value))
        table.add_section()
    console.print(table)
    for sec in sections:
        for note in sec.notes if not sec.skipped else []:
            console.print(f"[dim]{sec.key}: {note}[/dim]")
    console.print(f"report: {Path(summary['out_dir']) / 'report.html'}  (also report.md, "
                  f"summary.json, CSVs and PNGs)")
