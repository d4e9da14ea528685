"""The rollout record dataclass, crash-safe appends to rollouts.jsonl and streaming readers.

The schema and validation live in `opdcli.records.schema`; `opdcli.records` re-exports both
modules' public names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opdcli.errors import RecordError
from opdcli.records.schema import (
    FLOAT_DECIMALS,
    FLOAT_LISTS,
    FLOAT_MATRICES,
    INT_TYPES,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    check_header,
    show_value,
    validate_record,
)

# --------------------------------------------------------------------------------------------
# The record dataclass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutRecord:
    """One trajectory: a student sample, its per-token log-probs and the teacher's scores.

    All per-token lists have length T = len(response_ids), aligned so that `student_lp[t]` is
    the log-prob of `response_ids[t]` given the prompt and `response_ids[:t]`.
    Construction does not validate; `from_json` does, and so does `RolloutWriter.write`.
    """

    run_id: str
    step: int
    policy_version: int
    sample_id: str
    prompt_id: str
    prompt: str
    response_text: str
    response_ids: list[int]
    mask: list[int]
    student_lp: list[float | None]
    teacher_lp: list[float | None]
    behavior_lp: list[float | None]
    finished: bool
    ref_lp: list[float | None] | None = None
    topk: int | None = None
    student_topk_ids: list[list[int]] | None = None
    teacher_topk_ids: list[list[int]] | None = None
    student_topk_lp: list[list[float]] | None = None
    teacher_topk_lp: list[list[float]] | None = None
    teacher_lp_on_student_topk: list[list[float]] | None = None
    student_lp_on_teacher_topk: list[list[float]] | None = None
    correct: bool | None = None
    answer: str | None = None
    method: dict[str, Any] | None = None
    version_lag: int | None = None
    freshness: float | None = None
    teacher: str | None = None
    """The model.teachers tag of the domain teacher that scored the sample (None: model.teacher)."""

    @property
    def num_tokens(self) -> int:
        """T, the number of response tokens."""
        return len(self.response_ids)

    def to_json(self) -> dict[str, Any]:
        """The JSON object for this record (optional fields that are None are left out).

        Lists are shared with the record, not copied.
        """
        out: dict[str, Any] = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION}
        for name in REQUIRED_FIELDS:
            out[name] = getattr(self, name)
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, obj: dict, *, where: str = "") -> RolloutRecord:
        """Validate a decoded JSON object and build a record from it (raises `RecordError`)."""
        validate_record(obj, where=where)
        return _build(obj)


_OPTIONAL_NAMES = tuple(
    f.name for f in dataclasses.fields(RolloutRecord) if f.name in OPTIONAL_FIELDS
)


def _build(obj: Mapping[str, Any]) -> RolloutRecord:
    """Construct a record from an already-checked object (no validation)."""
    kwargs = {name: obj[name] for name in REQUIRED_FIELDS}
    for name in _OPTIONAL_NAMES:
        kwargs[name] = obj.get(name)
    method = kwargs["method"]
    if isinstance(method, dict):
        kwargs["method"] = {
            "name": method.get("name"),
            "token": method.get("token", {}),
            "trajectory": method.get("trajectory", {}),
        }
    return RolloutRecord(**kwargs)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


_SCALE = 10.0**FLOAT_DECIMALS


def _round_list(values: list) -> list:
    """Round every float of a validated list to FLOAT_DECIMALS (nulls stay null)."""
    try:
        # round(x * 1e5) / 1e5 is the nearest double to a 5-decimal number, about twice as
        # fast as round(x, 5); it overflows only for |x| > 1e303, handled below.
        if None in values:
            return [None if x is None else round(x * _SCALE) / _SCALE for x in values]
        return [round(x * _SCALE) / _SCALE for x in values]
    except OverflowError:
        return [None if x is None else round(x, FLOAT_DECIMALS) for x in values]


def _rounded(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a validated record object with every float rounded to FLOAT_DECIMALS."""
    out = dict(obj)
    for name in FLOAT_LISTS:
        if out.get(name) is not None:
            out[name] = _round_list(out[name])
    for name in FLOAT_MATRICES:
        if out.get(name) is not None:
            out[name] = [_round_list(row) for row in out[name]]
    if out.get("freshness") is not None:
        out["freshness"] = round(out["freshness"], FLOAT_DECIMALS)
    method = out.get("method")
    if isinstance(method, dict):
        method = dict(method)
        if "token" in method:
            # Integer-valued outputs (e.g. 0/1 events) stay integers.
            method["token"] = {
                k: v if set(map(type, v)) <= INT_TYPES else _round_list(v)
                for k, v in method["token"].items()
            }
        if "trajectory" in method:
            method["trajectory"] = {
                k: round(v, FLOAT_DECIMALS) if type(v) is float else v
                for k, v in method["trajectory"].items()
            }
        out["method"] = method
    return out


def _scan_tail(f: Any, size: int) -> int:
    """Offset just past the last b"\\n" in the open binary file `f` of `size` bytes (0 if none)."""
    pos = size
    chunk = 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        data = f.read(pos - start)
        i = data.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def repair_jsonl_tail(path: str | os.PathLike[str], what: str = "record") -> None:
    """Make an append-only JSONL file end in a complete line before appending to it.

    A last line without its newline that parses as a JSON object gets the newline; one cut off
    mid-write (a killed writer) is truncated away; anything else raises RecordError. Each repair
    emits one warning naming the file.
    """
    path = os.fspath(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        cut = _scan_tail(f, size)
        f.seek(cut)
        tail = f.read(size - cut)
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError):
            complete = False
        if complete:
            f.seek(size)
            f.write(b"\n")
            warnings.warn(
                f"{path}: last line had no trailing newline; added one before appending",
                stacklevel=4,
            )
        elif is_truncation(tail):
            f.truncate(cut)
            warnings.warn(
                f"{path}: removed a partial last line ({size - cut} bytes at byte "
                f"offset {cut}; a {what} cut off by an interrupted write) before appending",
                stacklevel=4,
            )
        else:
            raise RecordError(
                f"{path}: the last line ({size - cut} bytes at byte offset {cut}) is "
                f"neither a {what} nor a {what} cut off mid-write; refusing to append to "
                "what may not be such a file - check the path or move the file aside"
            )
        f.flush()
        os.fsync(f.fileno())


class RolloutWriter:
    """Append rollout records to a rollouts.jsonl file, crash-safely.

    Each record is validated and serialised completely before anything is written, then written
    with one `write` call and flushed; the file is fsynced every `fsync_every` records and on
    close. A killed run therefore leaves at most one partial last line. When opened on a file
    whose last line has no trailing newline, the writer repairs it first: a line that is a
    complete JSON object just gets its newline; anything else is a record cut off mid-write and
    is truncated away (it was never complete). Both cases emit one warning.

    Use one writer per file at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync_every: int = 64) -> None:
        if type(fsync_every) is not int or fsync_every < 0:
            raise ValueError(f"fsync_every must be an int >= 0, got {fsync_every!r}")
        self.path = os.fspath(path)
        self.fsync_every = fsync_every
        self._count = 0
        self._since_sync = 0
        self.listeners: list[Any] = []
        """Called with each record (its JSON object) once it is written (experiment trackers)."""
        created = not os.path.exists(self.path)
        try:
            self._repair_tail()
            self._file = open(self.path, "ab")
        except OSError as exc:
            raise RecordError(
                f"{self.path}: cannot open for appending rollout records: {exc.strerror or exc}"
            ) from exc
        if created:
            self._fsync_dir()

    # -- setup ---------------------------------------------------------------------------------

    def _repair_tail(self) -> None:
        repair_jsonl_tail(self.path, "record")

    def _fsync_dir(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- writing -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._file.closed

    @property
    def count(self) -> int:
        """Records written by this writer."""
        return self._count

    def write(self, record: RolloutRecord | dict) -> None:
        """Validate, serialise and append one record; nothing is written if it is invalid."""
        if self._file.closed:
            raise ValueError(f"{self.path}: write to a closed RolloutWriter")
        where = f"{self.path} (record {self._count + 1} of this writer)"
        if isinstance(record, RolloutRecord):
            obj = record.to_json()
        elif isinstance(record, dict):
            obj = record
        else:
            raise RecordError(
                f"{where}: expected a RolloutRecord or dict, found {type(record).__name__}"
            )
        validate_record(obj, where=where)
        try:
            line = json.dumps(_rounded(obj), allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{where}: cannot serialise record as JSON: {exc}") from exc
        self._file.write((line + "\n").encode("utf-8"))
        self._file.flush()
        self._count += 1
        self._since_sync += 1
        for listener in self.listeners:
            listener(obj)
        if self.fsync_every and self._since_sync >= self.fsync_every:
            os.fsync(self._file.fileno())
            self._since_sync = 0

    def close(self) -> None:
        """Flush, fsync and close the file (idempotent)."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _default_on_partial(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def is_truncation(raw: bytes) -> bool:
    """Whether an unterminated last line looks like a record cut off mid-write."""
    text = raw.lstrip()
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    if not text.startswith(b"{"):
        return not text.strip(b"\x00")  # a NUL-filled tail left by a crash
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Only a multi-byte character cut at the very end is a truncation.
        return exc.reason == "unexpected end of data"
    return True


def read_raw(
    path: str | os.PathLike[str],
    *,
    validate: bool = True,
    on_partial: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream `(lineno, obj)` for every record of a rollouts.jsonl file, one line at a time.

    Blank lines are skipped. An unterminated last line that does not parse (a record cut off by
    an interrupted write) is reported through `on_partial` (default: `warnings.warn`) and
    skipped. Every other bad line raises `RecordError` naming `path:lineno`. With
    `validate=False` only `schema` / `schema_version` are checked, so newer files are still
    refused. A missing file raises `RecordError` immediately.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise RecordError(f"{name}: rollouts file not found; check the path or the run directory")
    if os.path.isdir(name):
        raise RecordError(f"{name}: is a directory, expected a rollouts.jsonl file")
    return _iter_raw(name, validate, on_partial or _default_on_partial)


def _iter_raw(
    name: str, validate: bool, on_partial: Callable[[str], None]
) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        f = open(name, "rb")
    except OSError as exc:
        raise RecordError(f"{name}: cannot open rollouts file: {exc.strerror or exc}") from exc
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            terminated = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if not terminated and is_truncation(raw):
                    on_partial(partial_message(where, raw))
                    continue
                raise RecordError(
                    f"{where}: file is not UTF-8 text (undecodable byte at column "
                    f"{exc.start + 1}); rollouts files are JSON lines"
                ) from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            try:
                obj = json.loads(text)
            except ValueError as exc:
                if not terminated and is_truncation(raw):
                    on_partial(partial_message(where, raw))
                    continue
                detail = getattr(exc, "msg", str(exc))
                col = getattr(exc, "colno", None)
                at = f" at column {col}" if col is not None else ""
                raise RecordError(
                    f"{where}: not valid JSON ({detail}{at}); each line must be one JSON object"
                ) from None
            if type(obj) is not dict:
                raise RecordError(
                    f"{where}: expected a JSON object (one rollout record), found {show_value(obj)}"
                )
            if validate:
                validate_record(obj, where=where)
            else:
                check_header(obj, where)
            yield lineno, obj


def partial_message(where: str, raw: bytes) -> str:
    return (
        f"{where}: skipped an incomplete last line ({len(raw)} bytes, no trailing newline); "
        "a record cut off by an interrupted write"
    )


def read_records(
    path: str | os.PathLike[str],
    *,
    validate: bool = True,
    on_partial: Callable[[str], None] | None = None,
) -> Iterator[RolloutRecord]:
    """Stream `RolloutRecord`s from a rollouts.jsonl file, one line at a time.

    Same line handling as `read_raw`. With `validate=False` records are built without checking
    field types (only the schema header and the presence of required fields are checked).
    """
    rows = read_raw(path, validate=validate, on_partial=on_partial)
    return _iter_records(os.fspath(path), rows, validate)


def _iter_records(
    name: str, rows: Iterator[tuple[int, dict[str, Any]]], validate: bool
) -> Iterator[RolloutRecord]:
    for lineno, obj in rows:
        if not validate:
            for field in REQUIRED_FIELDS:
                if field not in obj:
                    raise RecordError(f"{name}:{lineno}: missing required field '{field}'")
        yield _build(obj)
