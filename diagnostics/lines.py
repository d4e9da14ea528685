"""One rollouts.jsonl line -> a validated `Rollout` of numpy arrays, fast.

Every line is validated against the schema (`opdcli.records.validate_record`). The fast path
cuts the large numeric fields (per-token lists and top-K matrices) out of the line's bytes,
parses them with `diagnostics.numbers` and checks them with numpy, and hands the small rest to
`json.loads` and `validate_record` (with the numeric fields replaced by cheap stand-ins of the
right length). Anything unusual (a duplicated key, whitespace inside a number array, nulls, a
number the vectorised reader does not handle, any failed check) falls back to the reference
path, `json.loads` of the whole line plus `validate_record`, which raises the canonical
`RecordError` (naming `file:line` and the field) or accepts the record. The two paths accept
exactly the same records.

Tokens with mask 0 are dropped: every array of a `Rollout` covers the scored tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diagnostics.numbers import list_length, parse_array
from opdcli.errors import RecordError
from opdcli.records import LOGPROB_TOLERANCE, MAX_TOPK, validate_record

INT_LISTS = ("response_ids", "mask")
FLOAT_LISTS = ("student_lp", "teacher_lp", "behavior_lp", "ref_lp")
ID_MATRICES = ("student_topk_ids", "teacher_topk_ids")
LP_MATRICES = ("student_topk_lp", "teacher_topk_lp", "teacher_lp_on_student_topk", "student_lp_on_teacher_topk")
MATRICES = ID_MATRICES + LP_MATRICES
REQUIRED_MATRICES = ("student_topk_ids", "teacher_topk_ids", "student_topk_lp", "teacher_topk_lp")
_TARGETS = frozenset(k.encode() for k in INT_LISTS + FLOAT_LISTS + MATRICES)
_MATRIX_NAMES = frozenset(k.encode() for k in MATRICES)


@dataclass
class Rollout:
    """One validated record restricted to its scored (mask = 1) tokens; T = `n_tokens`.

    key: (file index, byte offset of the line): a stable order and seed, independent of how
    the files were split between worker processes. Top-K matrices are (T, K) or None.
    """

    key: tuple[int, int]
    step: int
    policy_version: int
    version_lag: int | None
    freshness: float | None
    response_text: str
    student_lp: np.ndarray
    teacher_lp: np.ndarray
    behavior_lp: np.ndarray
    topk: int
    student_topk_ids: np.ndarray | None
    teacher_topk_ids: np.ndarray | None
    student_topk_lp: np.ndarray | None
    teacher_topk_lp: np.ndarray | None
    teacher_lp_on_student_topk: np.ndarray | None
    trajectory: dict[str, Any]
    token_outputs: dict[str, list]
    memo: dict[str, Any] = field(default_factory=dict)
    student_lp_on_teacher_topk: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.student_lp.size)


class _Fallback(Exception):
    """The fast path cannot vouch for this line; use json.loads + validate_record."""


def _floats_from_json(values: list) -> np.ndarray:
    """A JSON float list (nulls allowed where the mask is 0) as float64 with NaN for null."""
    if None in values:
        return np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


def _string_end(line: bytes, q: int) -> int:
    """Index of the quote closing the JSON string that opens at `q` (-1 if none)."""
    e = line.find(b'"', q + 1)
    while e > 0 and line[e - 1] == 92:  # a backslash before it: escaped unless doubled
        k = e - 1
        while line[k] == 92:
            k -= 1
        if (e - 1 - k) % 2 == 0:
            break
        e = line.find(b'"', e + 1)
    return e


def _value_end(line: bytes, name: bytes, v: int) -> int:
    """End of the numeric array value of `name` starting at v (-1 when it is not one).

    A numeric array holds no quote, so the value ends at the comma before the next key's quote
    (found with a fast byte search), or at the closing brace when it is the last field.
    """
    if not line.startswith(b"[", v):
        return -1
    q = line.find(b'"', v)
    end = line.rfind(b",", v, q) if q >= 0 else line.rfind(b"}", v)
    if end < 0:
        return -1
    closing = b"]]" if name in _MATRIX_NAMES and not line.startswith(b"[]", v) else b"]"
    return end if line.endswith(closing, v, end) else -1


def _spans(line: bytes) -> dict[str, tuple[int, int]]:
    """Byte span of the value of every numeric field, found by walking the line's strings.

    Numeric arrays hold no quotes, so the walk jumps over them; a field name seen twice (a
    method output with the same name, a duplicated key) sends the line to the reference path.
    """
    spans: dict[str, tuple[int, int]] = {}
    seen: set[bytes] = set()
    pos = 0
    while True:
        q = line.find(b'"', pos)
        if q < 0:
            return spans
        e = _string_end(line, q)
        if e < 0:
            raise _Fallback
        name = line[q + 1:e]
        pos = e + 1
        if name in _TARGETS and line[e + 1:e + 2] == b":":
            if name in seen:
                raise _Fallback
            seen.add(name)
            end = _value_end(line, name, e + 2)
            if end >= 0:
                spans[name.decode()] = (e + 2, end)
                pos = end


def _parse_list(name: str, text: bytes) -> np.ndarray | None:
    return parse_array(text, None, list_length(text), ints=name in INT_LISTS)


def _cut(line: bytes, spans: dict[str, tuple[int, int]]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse the flat lists now; cut them and every matrix out of the line; json the rest."""
    arrays: dict[str, Any] = {}
    cut = []
    for name, (a, b) in spans.items():
        if name in MATRICES:
            arrays[name] = line[a:b]
            cut.append((a, b))
            continue
        values = _parse_list(name, line[a:b])
        if values is not None:
            arrays[name] = values
            cut.append((a, b))
    cut.sort()
    pieces, pos = [], 0
    for a, b in cut:
        pieces.append(line[pos:a])
        pieces.append(b"0")
        pos = b
    pieces.append(line[pos:])
    try:
        obj = json.loads(b"".join(pieces).decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise _Fallback from None
    if type(obj) is not dict:
        raise _Fallback
    for name in arrays:
        if type(obj.get(name)) is not int or obj[name] != 0:
            raise _Fallback  # the cut value was not the top-level field
    return obj, arrays


def _check_lists(obj: dict[str, Any], arrays: dict[str, Any], n: int) -> None:
    """Validate the cut lists and replace them in `obj` by cheap stand-ins for validate_record."""
    for name, values in arrays.items():
        if name in MATRICES:
            continue
        if values.size != n:
            raise _Fallback
        if name == "response_ids":
            obj[name] = [0] * n
        elif name == "mask":
            if values.size and values.max() > 1:
                raise _Fallback
            obj[name] = values.tolist()
        else:
            if values.size and values.max() > LOGPROB_TOLERANCE:
                raise _Fallback
            obj[name] = [0.0] * n


def _matrices(obj: dict[str, Any], arrays: dict[str, Any], n: int) -> tuple[int, dict[str, np.ndarray]]:
    """topk and the parsed, checked top-K matrices (removed from `obj`)."""
    topk = obj.pop("topk", None)
    for name in MATRICES:
        value = obj.pop(name, None)
        if value is not None and name not in arrays:
            raise _Fallback
    texts = {name: arrays.pop(name) for name in MATRICES if name in arrays}
    if topk is None or (type(topk) is int and topk == 0):
        if texts:
            raise _Fallback
        return 0, {}
    if type(topk) is not int or not 0 < topk <= MAX_TOPK:
        raise _Fallback
    if any(name not in texts for name in REQUIRED_MATRICES):
        raise _Fallback
    out = {}
    for name, text in texts.items():
        values = parse_array(text, n, topk, ints=name in ID_MATRICES)
        if values is None:
            raise _Fallback
        if name in LP_MATRICES and values.size and values.max() > LOGPROB_TOLERANCE:
            raise _Fallback
        out[name] = values.reshape(n, topk)
    return topk, out


def _fast(line: bytes, key: tuple[int, int]) -> Rollout:
    obj, arrays = _cut(line, _spans(line))
    ids = arrays.get("response_ids")
    if ids is None:
        ids = obj.get("response_ids")
        if type(ids) is not list:
            raise _Fallback
    n = len(ids)
    _check_lists(obj, arrays, n)
    topk, mats = _matrices(obj, arrays, n)
    try:
        validate_record(obj)
    except RecordError:
        raise _Fallback from None
    mask = arrays.get("mask")
    if mask is None:
        mask = np.asarray(obj["mask"], dtype=np.int64)
    lists = {name: arrays[name] if name in arrays else _floats_from_json(obj[name])
             for name in ("student_lp", "teacher_lp", "behavior_lp")}
    return _build(obj, key, mask, lists, topk, mats)


def _build(obj: dict[str, Any], key: tuple[int, int], mask: np.ndarray,
           lists: dict[str, np.ndarray], topk: int, mats: dict[str, np.ndarray]) -> Rollout:
    keep = None if mask.all() else mask.astype(bool)
    if keep is not None:
        lists = {name: values[keep] for name, values in lists.items()}
        mats = {name: values[keep] for name, values in mats.items()}
    method = obj.get("method") or {}
    return Rollout(
        key=key, step=obj["step"], policy_version=obj["policy_version"],
        version_lag=obj.get("version_lag"), freshness=obj.get("freshness"),
        response_text=obj["response_text"], topk=topk, trajectory=method.get("trajectory") or {},
        token_outputs=_masked_outputs(method.get("token") or {}, keep),
        student_topk_ids=mats.get("student_topk_ids"), teacher_topk_ids=mats.get("teacher_topk_ids"),
        student_topk_lp=mats.get("student_topk_lp"), teacher_topk_lp=mats.get("teacher_topk_lp"),
        teacher_lp_on_student_topk=mats.get("teacher_lp_on_student_topk"),
        student_lp_on_teacher_topk=mats.get("student_lp_on_teacher_topk"), **lists)


def _masked_outputs(token: dict[str, list], keep: np.ndarray | None) -> dict[str, list]:
    if keep is None:
        return token
    return {name: [x for x, k in zip(values, keep, strict=True) if k] for name, values in token.items()}


def _reference(obj: Any, where: str, key: tuple[int, int]) -> Rollout:
    """validate_record on the whole object (raises the canonical error), then arrays."""
    validate_record(obj, where=where)  # also refuses a line that is not a JSON object
    topk = obj.get("topk") or 0
    mats = {}
    if topk:
        n = len(obj["response_ids"])
        for name in MATRICES:
            if obj.get(name) is not None:
                dtype = np.int64 if name in ID_MATRICES else np.float64
                mats[name] = np.asarray(obj[name], dtype=dtype).reshape(n, topk)
    lists = {name: _floats_from_json(obj[name]) for name in ("student_lp", "teacher_lp", "behavior_lp")}
    return _build(obj, key, np.asarray(obj["mask"], dtype=np.int64), lists, topk, mats)


def parse_line(raw: bytes, key: tuple[int, int], where: Callable[[], str], *, first: bool,
               on_partial: Callable[[str], None] | None = None) -> Rollout | None:
    """Validate and convert one non-blank line (with its newline, if any).

    Returns None for a skipped partial last line (reported through `on_partial`). Raises
    `RecordError` for anything malformed, with the messages of `opdcli.records.read_raw`.
    """
    try:
        return _fast(raw, key)
    except _Fallback:
        pass
    obj = decode_line(raw, where(), first=first, on_partial=on_partial)
    if obj is None:
        return None
    return _reference(obj, where(), key)


def decode_line(raw: bytes, where: str, *, first: bool,
                on_partial: Callable[[str], None] | None) -> Any:
    """json.loads with read_raw's messages; None when an unterminated tail was skipped."""
    from opdcli.records import is_truncation, partial_message  # read_raw's own rules

    terminated = raw.endswith(b"\n")
    cut_off = not terminated and on_partial is not None and is_truncation(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut_off:
            on_partial(partial_message(where, raw))
            return None
        raise RecordError(f"{where}: file is not UTF-8 text (undecodable byte at column "
                          f"{exc.start + 1}); rollouts files are JSON lines") from None
    if first and text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except ValueError as exc:
        if cut_off:
            on_partial(partial_message(where, raw))
            return None
        detail = getattr(exc, "msg", str(exc))
        col = getattr(exc, "colno", None)
        at = f" at column {col}" if col is not None else ""
        raise RecordError(f"{where}: not valid JSON ({detail}{at}); each line must be one JSON "
                          "object") from None
