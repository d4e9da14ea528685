"""report.md and a self-contained report.html (PNGs embedded as base64 data URIs)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from diagnostics.section import Section


def fmt(value: Any) -> str:
    """A value for a table cell: floats to 4 significant digits, NaN/None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _header(summary: dict[str, Any]) -> list[tuple[str, str]]:
    files = ", ".join(f"{f['path']} ({f['records']} records)" for f in summary["files"])
    topk = ", ".join(f"K={k}: {n}" for k, n in summary["topk"].items())
    return [("input", files), ("records", str(summary["records"])), ("scored tokens", str(summary["tokens"])),
            ("steps", ", ".join(map(str, summary["steps"][:20])) + (" ..." if len(summary["steps"]) > 20 else "")),
            ("stored top-K (records)", topk), ("relative-position bins", str(summary["bins"]))]


def write_markdown(path: Path, summary: dict[str, Any], sections: list[Section]) -> None:
    lines = ["# opd diagnose report", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header(summary)]
    for w in summary["warnings"]:
        lines.append(f"- **warning**: {w}")
    for sec in sections:
        lines += ["", f"## {sec.title}", "", sec.description, ""]
        lines += [f"> {note}" for note in sec.notes]
        if sec.notes:
            lines.append("")
        if sec.rows:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {m} | {fmt(v)} |" for m, v in sec.rows]
            lines.append("")
        if sec.table:
            cols = list(sec.table[0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in sec.table]
            lines.append("")
        lines += [f"![{sec.key}]({name})" for name in sec.images]
        data = [name for name in sec.files if name.endswith(".csv")]
        if data:
            lines += ["", "Data: " + ", ".join(f"[{n}]({n})" for n in data)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
.note { color: #7a5a00; background: #fff8e1; padding: 4px 8px; margin: 4px 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
"""


def _table(rows: list[list[Any]], head: list[str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_html(path: Path, summary: dict[str, Any], sections: list[Section]) -> None:
    out_dir = path.parent
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>opd diagnose report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>opd diagnose report</h1>", _table([[k, v] for k, v in _header(summary)])]
    parts += [f'<p class="note">warning: {html.escape(w)}</p>' for w in summary["warnings"]]
    for sec in sections:
        parts += ["<section>", f"<h2>{html.escape(sec.title)}</h2>", f"<p>{html.escape(sec.description)}</p>"]
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in sec.notes]
        if sec.rows:
            parts.append(_table([[m, v] for m, v in sec.rows], ["metric", "value"]))
        if sec.table:
            cols = list(sec.table[0])
            parts.append(_table([[r[c] for c in cols] for r in sec.table], cols))
        parts += [_image(out_dir / name) for name in sec.images]
        data = [name for name in sec.files if name.endswith(".csv")]
        if data:
            parts.append("<p>Data (next to this file): " + ", ".join(html.escape(n) for n in data) + "</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
