"""Vectorised, strict parsing of JSON number arrays straight from the bytes of a line.

`json.loads` spends most of its time on a rollouts.jsonl line building one Python float per
top-K entry (16,000 of them per 1,000-token record at K = 16). `parse_array` reads the text of
a JSON list of numbers, or of a matrix (list of equal-length lists), with numpy instead, and
refuses (returns None) anything it is not sure about, so that the caller can fall back to
`json.loads` plus `validate_record`, which then produces the canonical error message or
accepts the unusual but valid spelling.

Accepted: exactly the JSON grammar `[[n,...],...]` / `[n,...]` without whitespace, with numbers
`-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?` (integers only, non-negative, for ids).
Float values are bit-identical to Python's `float()`: the digits are read as an int64
mantissa m (at most 15 significant digits) and scaled once by an exact power of ten,
m * 10^p or m / 10^-p with |p| <= 22 (Clinger's fast path: one correctly rounded operation);
other numbers make the parse return None.
"""

from __future__ import annotations

import numpy as np

_P10 = 10.0 ** np.arange(23)
_MAX_MANTISSA = 10**15
_MAX_ID = 2**62


def _table(allowed: bytes, mapping: dict[int, int]) -> bytes:
    """A translate table: allowed bytes map to themselves (or `mapping`), all others to 'x'."""
    out = bytearray(b"x" * 256)
    for c in allowed:
        out[c] = mapping.get(c, c)
    return bytes(out)


# Brackets, '.' and '+' are deleted and e/E become separators (an exponent is read as its own
# integer); any byte outside the grammar becomes 'x', which numpy's integer reader refuses.
_FLOATS = _table(b"0123456789-.,eE+[]", {ord("e"): ord(","), ord("E"): ord(",")})
_INTS = _table(b"0123456789,[]", {})
_DROP = b"[].+"


def _digit(a: np.ndarray) -> np.ndarray:
    return (a - np.uint8(48)) < 10


def _bounds(a: np.ndarray, rows: int | None, cols: int) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last byte of every number, after checking the bracket/comma layout.

    rows None: a flat list `[n,n,...]` of `cols` numbers; else a `rows` x `cols` matrix.
    """
    depth = 1 if rows is None else 2
    n = cols if rows is None else rows * cols
    if a.size < 2 * depth + 1 or not ((a[:depth] == 91).all() and (a[-depth:] == 93).all()):
        return None
    commas = np.flatnonzero(a == 44)
    if commas.size != n - 1:
        return None
    starts = np.empty(n, dtype=np.int64)
    ends = np.empty(n, dtype=np.int64)
    starts[0], ends[-1] = depth, a.size - depth - 1
    starts[1:], ends[:-1] = commas + 1, commas - 1
    if rows is not None and cols < n:
        # between rows the comma sits in "],[": every cols-th one, and only those
        row_sep = commas[cols - 1::cols]
        if not ((a[row_sep - 1] == 93) & (a[row_sep + 1] == 91)).all():
            return None
        starts[cols::cols] += 1
        ends[cols - 1:-1:cols] -= 1
    if (starts > ends).any():
        return None
    # every bracket must be one of those placed above: count them
    opened = np.count_nonzero(a == 91)
    closed = np.count_nonzero(a == 93)
    expected = 1 if rows is None else rows + 1
    if opened != expected or closed != expected:
        return None
    return starts, ends


def _first_digits_ok(a: np.ndarray, starts: np.ndarray, ends: np.ndarray, signed: bool) -> bool:
    """Every number starts with a digit (after an optional '-') with no leading zero."""
    if signed:
        starts = starts + (a[starts] == 45)
        if (starts > ends).any():
            return False
    first = a[starts]
    if not _digit(first).all():
        return False
    zero = (first == 48) & (starts < ends)
    return not _digit(a[starts[zero] + 1]).any()


def _owner(starts: np.ndarray, ends: np.ndarray, pos: np.ndarray,
           guess: np.ndarray | None = None) -> np.ndarray | None:
    """Index of the number holding each position; None unless at most one per number.

    `guess` (the numbers expected to hold one, in order) skips the binary search when right.
    """
    if guess is None and pos.size == starts.size:
        guess = np.arange(pos.size)  # the usual case: one in every number
    if guess is not None and guess.size == pos.size:
        if (pos > starts[guess]).all() and (pos <= ends[guess]).all():
            return guess
    num = np.searchsorted(starts, pos, side="right") - 1
    if num.size > 1 and not (np.diff(num) > 0).all():
        return None
    return num


def _exponents(a, text, starts, ends, pieces):
    """(mantissas, exponents, last mantissa byte, numbers with an exponent) or None."""
    n = starts.size
    if b"e" not in text and b"E" not in text:
        return (pieces, np.zeros(n, dtype=np.int64), ends, None) if pieces.size == n else None
    epos = np.flatnonzero((a | np.uint8(32)) == 101)
    num = _owner(starts, ends, epos)
    if num is None or pieces.size != n + epos.size or (epos >= ends[num]).any():
        return None
    if not _digit(a[epos - 1]).all():
        return None
    lead = epos + 1 + ((a[epos + 1] == 43) | (a[epos + 1] == 45))
    if (lead > ends[num]).any() or not _digit(a[lead]).all():
        return None
    is_exp = np.zeros(pieces.size, dtype=bool)
    is_exp[num + np.arange(epos.size) + 1] = True
    exps = np.zeros(n, dtype=np.int64)
    exps[num] = pieces[is_exp]
    mant_end = ends.copy()
    mant_end[num] = epos - 1
    return pieces[~is_exp], exps, mant_end, num


def _floats(a: np.ndarray, text: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    try:
        pieces = np.fromstring(text.translate(_FLOATS, _DROP), dtype=np.int64, sep=",")
    except ValueError:
        return None
    if not _first_digits_ok(a, starts, ends, signed=True):
        return None
    if b"+" in text:
        plus = np.flatnonzero(a == 43)
        if not ((a[plus - 1] | np.uint8(32)) == 101).all():
            return None
    parts = _exponents(a, text, starts, ends, pieces)
    if parts is None:
        return None
    mantissa, exps, mant_end, with_exp = parts
    frac = np.zeros(starts.size, dtype=np.int64)
    if b"." in text:
        dots = np.flatnonzero(a == 46)
        guess = None
        if with_exp is not None:  # Python writes small numbers as "-2e-05": no dot there
            has_dot = np.ones(starts.size, dtype=bool)
            has_dot[with_exp] = False
            guess = np.flatnonzero(has_dot)
        num = _owner(starts, ends, dots, guess)
        if num is None or (dots >= mant_end[num]).any():
            return None
        if not (_digit(a[dots - 1]).all() and _digit(a[dots + 1]).all()):
            return None
        frac[num] = mant_end[num] - dots
    if np.abs(mantissa).max() >= _MAX_MANTISSA:
        return None
    power = exps - frac
    if power.min() < -22 or power.max() > 22:
        return None
    m = mantissa.astype(np.float64)
    return np.where(power >= 0, m * _P10[np.clip(power, 0, 22)], m / _P10[np.clip(-power, 0, 22)])


def _ints(a: np.ndarray, text: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    try:
        values = np.fromstring(text.translate(_INTS, b"[]"), dtype=np.int64, sep=",")
    except ValueError:
        return None
    if values.size != starts.size or not _first_digits_ok(a, starts, ends, signed=False):
        return None
    if values.min() < 0 or values.max() >= _MAX_ID:
        return None
    return values


def parse_array(text: bytes, rows: int | None, cols: int, *, ints: bool) -> np.ndarray | None:
    """Parse a JSON list (rows None; `cols` entries) or a rows x cols matrix of numbers.

    Returns a flat int64 (ints: non-negative integers) or float64 array of rows * cols values,
    or None when the text is not exactly such an array (or not handled here).
    """
    n = cols if rows is None else rows * cols
    if n == 0:
        return np.zeros(0, dtype=np.int64 if ints else np.float64) if text == b"[]" else None
    a = np.frombuffer(text, dtype=np.uint8)
    bounds = _bounds(a, rows, cols)
    if bounds is None:
        return None
    return _ints(a, text, *bounds) if ints else _floats(a, text, *bounds)


def list_length(text: bytes) -> int:
    """Entries of a flat JSON list of numbers, counted by its commas (0 for `[]`)."""
    if text == b"[]":
        return 0
    return int(np.count_nonzero(np.frombuffer(text, dtype=np.uint8) == 44)) + 1
