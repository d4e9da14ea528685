"""The rollouts.jsonl record format (schema and validation): one JSON object per line, one line per trajectory.

A trajectory is one student sample scored by the teacher. `docs/rollouts-schema.md` documents
every field; this module is the single place that reads, writes and validates the format.

- `RolloutRecord` is the typed, immutable view of one line (`to_json` / `from_json`).
- `validate_record` checks a decoded JSON object against the schema and raises `RecordError`
  with a one-line message naming the location, the field, what was expected and what was found.
- `RolloutWriter` appends records crash-safely: each record is serialised completely, then
  written with a single `write` call and flushed, so an interrupted run leaves at most one
  partial last line, which the next writer removes before appending.
- `read_records` / `read_raw` stream a file line by line, skipping (and reporting) a truncated
  last line and raising `RecordError` for anything else that is malformed.
"""

from __future__ import annotations

import difflib
import math
from array import array
from collections.abc import Mapping
from itertools import chain
from typing import Any

from opdcli.errors import RecordError

SCHEMA_NAME = "opd.rollout"
SCHEMA_VERSION = 1

#: Log-probabilities may exceed 0 by at most this much (numerical noise of log-softmax).
LOGPROB_TOLERANCE = 1e-4
#: Largest number of top-k entries a record may store per token.
MAX_TOPK = 64
#: Floats are rounded to this many decimals when written.
FLOAT_DECIMALS = 5

_NUMBER_TYPES = frozenset({int, float})
INT_TYPES = frozenset({int})
_LIST_TYPES = frozenset({list})

_HEADER_FIELDS = ("schema", "schema_version")
REQUIRED_FIELDS = (
    "run_id",
    "step",
    "policy_version",
    "sample_id",
    "prompt_id",
    "prompt",
    "response_text",
    "response_ids",
    "mask",
    "student_lp",
    "teacher_lp",
    "behavior_lp",
    "finished",
)
_TOPK_MATRICES = ("student_topk_ids", "teacher_topk_ids", "student_topk_lp", "teacher_topk_lp")
OPTIONAL_FIELDS = (
    "ref_lp",
    "topk",
    *_TOPK_MATRICES,
    "teacher_lp_on_student_topk",
    "student_lp_on_teacher_topk",
    "correct",
    "answer",
    "method",
    "version_lag",
    "freshness",
    "teacher",
)
_ALL_FIELDS = frozenset(_HEADER_FIELDS + REQUIRED_FIELDS + OPTIONAL_FIELDS)
_METHOD_KEYS = ("name", "token", "trajectory")

# Float-valued fields, rounded on write.
FLOAT_LISTS = ("student_lp", "teacher_lp", "behavior_lp", "ref_lp")
FLOAT_MATRICES = ("student_topk_lp", "teacher_topk_lp", "teacher_lp_on_student_topk", "student_lp_on_teacher_topk")
_CROSS_MATRICES = ("teacher_lp_on_student_topk", "student_lp_on_teacher_topk")


# --------------------------------------------------------------------------------------------
# Error helpers
# --------------------------------------------------------------------------------------------


def show_value(value: Any, limit: int = 60) -> str:
    """A short, single-line rendering of an offending value, prefixed by its JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"int {value!r}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, list):
        return f"list of length {len(value)}"
    if isinstance(value, dict):
        return f"object with keys {sorted(map(str, value))[:6]!r}"
    kind = "string" if isinstance(value, str) else type(value).__name__
    text = repr(value).replace("\n", "\\n").replace("\r", "\\r")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind} {text}"


def _loc(where: str) -> str:
    return where if where else "rollout record"


def _fail(where: str, field: str, expected: str, found: str, fix: str = "") -> RecordError:
    message = f"{_loc(where)}: field '{field}': expected {expected}, found {found}"
    if fix:
        message += f"; {fix}"
    return RecordError(message.replace("\n", " "))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_header(obj: Mapping[str, Any], where: str) -> None:
    """Check `schema` and `schema_version`; refuse files from newer versions of opd."""
    if "schema" not in obj:
        raise _fail(
            where,
            "schema",
            f"the string {SCHEMA_NAME!r}",
            "nothing (missing)",
            "this line is not a rollout record",
        )
    schema = obj["schema"]
    if schema != SCHEMA_NAME or type(schema) is not str:
        raise _fail(
            where,
            "schema",
            f"the string {SCHEMA_NAME!r}",
            show_value(schema),
            "this line is not a rollout record",
        )
    if "schema_version" not in obj:
        raise _fail(where, "schema_version", f"int {SCHEMA_VERSION}", "nothing (missing)")
    version = obj["schema_version"]
    if type(version) is not int:
        raise _fail(where, "schema_version", f"int {SCHEMA_VERSION}", show_value(version))
    if version > SCHEMA_VERSION:
        raise _fail(
            where,
            "schema_version",
            f"at most {SCHEMA_VERSION}",
            f"{version} (written by a newer opd)",
            "upgrade opd to read this file",
        )
    if version != SCHEMA_VERSION:
        raise _fail(where, "schema_version", f"int {SCHEMA_VERSION}", show_value(version))


def _check_keys(obj: Mapping[str, Any], where: str) -> None:
    unknown = [k for k in obj if k not in _ALL_FIELDS]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), sorted(_ALL_FIELDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "remove it"
        raise RecordError(
            f"{_loc(where)}: unknown field {str(name)!r} (the schema is strict); {hint}"
        )
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise RecordError(
                f"{_loc(where)}: missing required field '{name}'; "
                f"see docs/rollouts-schema.md for the fields of schema version {SCHEMA_VERSION}"
            )


def _check_str(obj: Mapping[str, Any], name: str, where: str, *, nullable: bool = False) -> None:
    value = obj[name]
    if type(value) is str or (nullable and value is None):
        return
    raise _fail(where, name, "a string or null" if nullable else "a string", show_value(value))


def _check_nonneg_int(
    obj: Mapping[str, Any], name: str, where: str, *, nullable: bool = False
) -> None:
    value = obj[name]
    if value is None and nullable:
        return
    if type(value) is not int or value < 0:
        expected = "an int >= 0" + (" or null" if nullable else "")
        raise _fail(where, name, expected, show_value(value))


def _check_bool(obj: Mapping[str, Any], name: str, where: str, *, nullable: bool = False) -> None:
    value = obj[name]
    if type(value) is bool or (nullable and value is None):
        return
    raise _fail(where, name, "true/false" + (" or null" if nullable else ""), show_value(value))


def _check_list(value: Any, name: str, length: int, what: str, where: str) -> None:
    if type(value) is not list:
        raise _fail(where, name, f"a list of {length} {what}", show_value(value))
    if len(value) != length:
        raise _fail(
            where,
            name,
            f"length {length} (= len(response_ids))",
            f"length {len(value)}",
            "every per-token list must have one entry per response token",
        )


def _bad_float(x: Any, upper: float | None) -> str | None:
    """Why `x` is not an acceptable float (None if it is)."""
    if type(x) not in _NUMBER_TYPES:
        return "a number"
    if not math.isfinite(x):
        return "a finite number"
    if upper is not None and x > upper:
        return f"a log-probability <= {upper:g}"
    return None


def _floats_ok(values: list, upper: float | None) -> bool:
    """Fast path: every element is an int/float, finite, and <= upper."""
    if not values:
        return True
    if not set(map(type, values)) <= _NUMBER_TYPES:
        return False
    if not math.isfinite(sum(values)):  # NaN or +-inf anywhere poisons the sum
        return False
    return upper is None or max(values) <= upper


def _check_float_list(
    obj: Mapping[str, Any],
    name: str,
    length: int,
    where: str,
    *,
    upper: float | None,
    mask: list | None = None,
) -> None:
    """A list of `length` finite floats; entries may be null where `mask` is 0 (if given)."""
    value = obj[name]
    _check_list(value, name, length, "floats", where)
    if _floats_ok(value, upper):
        return
    for t, x in enumerate(value):
        if x is None and mask is not None:
            if mask[t] == 0:
                continue
            raise _fail(
                where,
                f"{name}[{t}]",
                "a finite float (null is only allowed where mask is 0)",
                "null",
            )
        why = _bad_float(x, upper)
        if why is not None:
            raise _fail(where, f"{name}[{t}]", why, show_value(x))


def _check_matrix(
    obj: Mapping[str, Any], name: str, length: int, k: int, where: str, *, ints: bool
) -> None:
    """A list of `length` rows, each a list of exactly `k` ints (ids) or log-prob floats."""
    value = obj[name]
    what = f"rows of {k} {'token ids' if ints else 'floats'}"
    _check_list(value, name, length, what, where)
    if not value:
        return
    # Fast path over the T*K entries with C-level builtins only. array("Q") rejects anything
    # that is not a non-negative int; sum() rejects non-numbers and turns any NaN/inf into a
    # non-finite total; max() checks the upper bound. The one JSON value these cannot tell
    # apart from a number is a boolean (false == 0), which no writer puts in these matrices.
    if set(map(type, value)) <= _LIST_TYPES and set(map(len, value)) == {k}:
        try:
            if ints:
                array("Q", chain.from_iterable(value))
                return
            total = sum(chain.from_iterable(value))
            if math.isfinite(total) and max(chain.from_iterable(value)) <= LOGPROB_TOLERANCE:
                return
        except (TypeError, OverflowError):
            pass
    # Slow path: locate the first offending entry for the message.
    for t, row in enumerate(value):
        if type(row) is not list:
            raise _fail(where, f"{name}[{t}]", f"a list of {k} entries (topk)", show_value(row))
        if len(row) != k:
            raise _fail(
                where,
                f"{name}[{t}]",
                f"length {k} (= topk)",
                f"length {len(row)}",
                "every top-k row must have exactly topk entries",
            )
        for j, x in enumerate(row):
            if ints:
                if type(x) is not int or x < 0:
                    raise _fail(where, f"{name}[{t}][{j}]", "a token id (int >= 0)", show_value(x))
            else:
                why = _bad_float(x, LOGPROB_TOLERANCE)
                if why is not None:
                    raise _fail(where, f"{name}[{t}][{j}]", why, show_value(x))


def _check_method(obj: Mapping[str, Any], length: int, where: str) -> None:
    method = obj["method"]
    if method is None:
        return
    if type(method) is not dict:
        raise _fail(
            where,
            "method",
            'an object {"name": ..., "token": ..., "trajectory": ...}',
            show_value(method),
        )
    for key in method:
        if key not in _METHOD_KEYS:
            raise RecordError(
                f"{_loc(where)}: unknown field 'method.{key}'; "
                f"a method object has only the keys {', '.join(_METHOD_KEYS)}"
            )
    if "name" not in method:
        raise _fail(where, "method.name", "a non-empty string", "nothing (missing)")
    if type(method["name"]) is not str or not method["name"]:
        raise _fail(where, "method.name", "a non-empty string", show_value(method["name"]))
    token = method.get("token", {})
    if type(token) is not dict:
        raise _fail(where, "method.token", "an object {name: list of floats}", show_value(token))
    for key in token:
        values = token[key]
        field = f"method.token.{key}"
        if type(values) is not list:
            raise _fail(where, field, f"a list of {length} floats", show_value(values))
        if len(values) != length:
            raise _fail(
                where,
                field,
                f"length {length} (= len(response_ids))",
                f"length {len(values)}",
                "per-token method outputs need one value per response token",
            )
        if not _floats_ok(values, None):
            for t, x in enumerate(values):
                why = _bad_float(x, None)
                if why is not None:
                    raise _fail(where, f"{field}[{t}]", why, show_value(x))
    trajectory = method.get("trajectory", {})
    if type(trajectory) is not dict:
        raise _fail(
            where,
            "method.trajectory",
            "an object {name: number, bool, string or null}",
            show_value(trajectory),
        )
    for key, x in trajectory.items():
        if x is None or type(x) in (bool, str, int):
            continue
        if type(x) is float and math.isfinite(x):
            continue
        raise _fail(
            where, f"method.trajectory.{key}", "a finite number, bool, string or null", show_value(x)
        )


def validate_record(obj: dict, *, where: str = "") -> None:
    """Check one decoded rollouts.jsonl line against the schema.

    Raises `RecordError` with a single-line message naming `where` (e.g. "rollouts.jsonl:12"),
    the field, what was expected and what was found. Returns None when the record is valid.
    """
    if type(obj) is not dict:
        raise RecordError(
            f"{_loc(where)}: expected a JSON object (one rollout record), found {show_value(obj)}"
        )
    check_header(obj, where)
    _check_keys(obj, where)

    for name in ("run_id", "sample_id", "prompt_id", "prompt", "response_text"):
        _check_str(obj, name, where)
    _check_nonneg_int(obj, "step", where)
    _check_nonneg_int(obj, "policy_version", where)
    _check_bool(obj, "finished", where)

    ids = obj["response_ids"]
    if type(ids) is not list:
        raise _fail(where, "response_ids", "a list of token ids (ints >= 0)", show_value(ids))
    length = len(ids)
    if ids and not (set(map(type, ids)) <= INT_TYPES and min(ids) >= 0):
        for t, x in enumerate(ids):
            if type(x) is not int or x < 0:
                raise _fail(where, f"response_ids[{t}]", "a token id (int >= 0)", show_value(x))

    mask = obj["mask"]
    _check_list(mask, "mask", length, "0/1 ints", where)
    if mask and not (set(map(type, mask)) <= INT_TYPES and set(mask) <= {0, 1}):
        for t, x in enumerate(mask):
            if type(x) is not int or x not in (0, 1):
                raise _fail(where, f"mask[{t}]", "0 or 1", show_value(x), "1 marks a trained token")

    for name in ("student_lp", "teacher_lp", "behavior_lp"):
        _check_float_list(obj, name, length, where, upper=LOGPROB_TOLERANCE, mask=mask)
    if obj.get("ref_lp") is not None:
        _check_float_list(obj, "ref_lp", length, where, upper=LOGPROB_TOLERANCE, mask=mask)

    topk = obj.get("topk")
    if topk is None or (type(topk) is int and topk == 0):
        for name in (*_TOPK_MATRICES, *_CROSS_MATRICES):
            if obj.get(name) is not None:
                raise _fail(
                    where,
                    name,
                    "no top-k data when topk is absent or 0",
                    show_value(obj[name]),
                    f"set topk to the row length or drop '{name}'",
                )
    else:
        if type(topk) is not int or not 0 <= topk <= MAX_TOPK:
            raise _fail(
                where,
                "topk",
                f"an int in 0..{MAX_TOPK}",
                show_value(topk),
                f"store at most {MAX_TOPK} entries per token" if type(topk) is int else "",
            )
        for name in _TOPK_MATRICES:
            if obj.get(name) is None:
                raise _fail(
                    where,
                    name,
                    f"a list of {length} rows of {topk} entries (required when topk > 0)",
                    "nothing (missing)",
                )
            _check_matrix(obj, name, length, topk, where, ints=name.endswith("_ids"))
        for name in _CROSS_MATRICES:
            if obj.get(name) is not None:
                _check_matrix(obj, name, length, topk, where, ints=False)

    if "correct" in obj:
        _check_bool(obj, "correct", where, nullable=True)
    if "answer" in obj:
        _check_str(obj, "answer", where, nullable=True)
    if "version_lag" in obj:
        _check_nonneg_int(obj, "version_lag", where, nullable=True)
    if "teacher" in obj:
        _check_str(obj, "teacher", where, nullable=True)
    if obj.get("freshness") is not None:
        x = obj["freshness"]
        if type(x) not in _NUMBER_TYPES or not math.isfinite(x):
            raise _fail(where, "freshness", "a finite float or null", show_value(x))
    if "method" in obj:
        _check_method(obj, length, where)
