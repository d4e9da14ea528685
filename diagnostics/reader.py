"""Stream rollouts.jsonl files into the analysis accumulators, in parallel for large inputs.

Files are cut into byte ranges that start at line boundaries; each range is streamed one line
at a time (never more than one record in memory), every line is validated
(`diagnostics.lines.parse_line`, the same rules as `opdcli.records.read_raw(validate=True)`),
and each record is added to per-range accumulators (`Collector`). Ranges run in worker
processes when the input is large, and the parent merges their accumulators in input order.

Line handling matches `read_raw`: blank lines are skipped, an unterminated last line that does
not parse (a record cut off mid-write) is skipped with a warning naming `file:line`, and every
other bad line raises `RecordError` naming `file:line` and the field. A file with no record is
an error naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from diagnostics.advantage import AdvantageAnalysis
from diagnostics.freshness import FreshnessAnalysis
from diagnostics.lines import Rollout, parse_line
from diagnostics.margin import MarginAnalysis
from diagnostics.prune import PruneAnalysis
from diagnostics.release import ReleaseAnalysis
from diagnostics.stats import Options
from diagnostics.topd import TopdAnalysis
from opdcli.errors import RecordError
from opdcli.records import read_raw

ANALYSES = (AdvantageAnalysis, MarginAnalysis, ReleaseAnalysis, PruneAnalysis, TopdAnalysis,
            FreshnessAnalysis)
PARALLEL_MIN_BYTES = 64 << 20
"""Inputs smaller than this are read in-process (no worker start-up cost)."""
CHUNK_BYTES = 256 << 20
MIN_CHUNK_BYTES = 16 << 20
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of input file number `index`; start is at a line boundary."""

    index: int
    path: str
    start: int
    end: int


@dataclass
class Collector:
    """All accumulators of one byte range (or, merged, of the whole input)."""

    opts: Options
    files: int
    analyses: list[Any] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    steps: set[int] = field(default_factory=set)
    topk: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.analyses = self.analyses or [cls(self.opts) for cls in ANALYSES]
        self.records = self.records or [0] * self.files
        self.tokens = self.tokens or [0] * self.files

    def add(self, rec: Rollout) -> None:
        self.records[rec.key[0]] += 1
        self.tokens[rec.key[0]] += rec.n_tokens
        self.steps.add(rec.step)
        self.topk[rec.topk] = self.topk.get(rec.topk, 0) + 1
        for analysis in self.analyses:
            analysis.add(rec)

    def merge(self, other: Collector) -> None:
        for mine, theirs in zip(self.analyses, other.analyses, strict=True):
            mine.merge(theirs)
        self.records = [a + b for a, b in zip(self.records, other.records, strict=True)]
        self.tokens = [a + b for a, b in zip(self.tokens, other.tokens, strict=True)]
        self.steps |= other.steps
        for k, n in other.topk.items():
            self.topk[k] = self.topk.get(k, 0) + n
        self.warnings += other.warnings


def _line_base(path: str, start: int) -> int:
    """Number of lines before byte `start` (counted only when a message needs it)."""
    count, done = 0, 0
    with open(path, "rb") as f:
        while done < start:
            block = f.read(min(16 << 20, start - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def scan_chunk(chunk: Chunk, opts: Options, files: int) -> Collector:
    """Validate and accumulate every record of one byte range."""
    out = Collector(opts, files)
    base: list[int] = []

    def where(local: int) -> Callable[[], str]:
        def text() -> str:
            if not base:
                base.append(_line_base(chunk.path, chunk.start))
            return f"{chunk.path}:{base[0] + local}"
        return text

    pos, local = chunk.start, 0
    with open(chunk.path, "rb") as f:
        f.seek(pos)
        while pos < chunk.end:
            raw = f.readline()
            if not raw:
                break
            local += 1
            offset, pos = pos, pos + len(raw)
            if raw[0] in _WHITESPACE and not raw.strip():
                continue
            rec = parse_line(raw, (chunk.index, offset), where(local), first=offset == 0,
                             on_partial=out.warnings.append)
            if rec is not None:
                out.add(rec)
    return out


def plan(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Byte ranges of at most about `chunk_bytes`, each starting at a line boundary."""
    chunks = []
    for index, path in enumerate(paths):
        size = os.path.getsize(path)
        cuts = [0]
        with open(path, "rb") as f:
            for target in range(chunk_bytes, size, chunk_bytes):
                if target <= cuts[-1]:
                    continue
                f.seek(target - 1)
                f.readline()  # to the end of the line that holds byte target - 1
                if f.tell() < size:
                    cuts.append(f.tell())
        cuts.append(size)
        chunks += [Chunk(index, path, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
        if size == 0:
            chunks.append(Chunk(index, path, 0, 0))
    return chunks


def _check_paths(paths: list[str]) -> None:
    if not paths:
        raise RecordError("no rollouts file given; pass one or more rollouts.jsonl files")
    for path in paths:
        read_raw(path)  # raises for a missing file or a directory (nothing is read yet)
        if os.path.getsize(path) == 0:
            raise _no_records(path)


def _no_records(name: str) -> RecordError:
    return RecordError(f"{name}: no rollout records (the file is empty or holds only blank "
                       "lines); pass a rollouts.jsonl written by opd train or opd rollout")


def collect(paths: list[str | Path], opts: Options, workers: int | None = None) -> Collector:
    """Validate every record of `paths` and accumulate all analyses.

    Args:
        paths: rollouts.jsonl files, analysed together.
        opts: analysis settings.
        workers: worker processes (default: the CPU count, at most 8; inputs under 64 MiB are
            read in-process).
    """
    names = [os.fspath(p) for p in paths]
    _check_paths(names)
    total = sum(os.path.getsize(p) for p in names)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or total < PARALLEL_MIN_BYTES:
        parts = (scan_chunk(c, opts, len(names)) for c in plan(names))
        return _merge(parts, opts, names)
    chunk_bytes = max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, total // (4 * workers) + 1))
    chunks = plan(names, chunk_bytes)
    # spawn: workers are the parent's own children, so their CPU time and memory show up in
    # its resource usage, and no state (threads, open files) leaks in from the parent
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        parts = pool.map(scan_chunk, chunks, [opts] * len(chunks), [len(names)] * len(chunks))
        return _merge(parts, opts, names)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merge(parts, opts: Options, names: list[str]) -> Collector:
    total = Collector(opts, len(names))
    for part in parts:
        total.merge(part)
    for index, name in enumerate(names):
        if total.records[index] == 0:
            raise _no_records(name)
    return total
