"""Sentence segments of a decoded response, as token index ranges.

The release rule of "Prefix Teach, Suffix Fade" (arXiv 2605.13643, methods.md §3.2 step 2)
averages token margins over NLTK-style sentence/punctuation segments. The paper uses NLTK's
pretrained sentence splitter; here:

* NLTK's `PunktSentenceTokenizer` is built from `PunktParameters()` with a hand-written
  abbreviation set instead of the downloaded `punkt_tab` English model, so nothing is fetched
  at run time. It keeps decimals (3.5) and `\\boxed{...}` together and does not break after
  the listed abbreviations.
* Spans are additionally split at newlines (one line of a derivation is one segment).
* Without nltk, a pure-regex splitter (`(?<=[.!?])\\s+|\\n+`) is used instead.
* Character offsets of tokens come from the decoded lengths of the response's prefixes, which
  works for any tokenizer (byte-level BPE included, where one character can span several
  tokens) rather than from a fast tokenizer's offset mapping.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from functools import lru_cache
from itertools import accumulate
from typing import Any, Literal

Span = tuple[int, int]

ABBREVIATIONS = frozenset({"e.g", "i.e", "mr", "mrs", "dr", "vs", "etc", "fig", "eq", "approx",
                           "cf", "al", "resp", "prof"})
"""Lower-case abbreviation types (without the final period) that never end a sentence."""

_REGEX_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_NEWLINES = re.compile(r"\n+")
_DECODE_BLOCK = 64


def _strip(text: str, start: int, end: int) -> Span | None:
    """The span without surrounding whitespace, or None when nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _split_between(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[Span]:
    """Pieces of text[start:end] between matches of `pattern`, stripped, non-empty."""
    spans, pos = [], start
    for match in pattern.finditer(text, start, end):
        piece = _strip(text, pos, match.start())
        if piece is not None:
            spans.append(piece)
        pos = match.end()
    piece = _strip(text, pos, end)
    if piece is not None:
        spans.append(piece)
    return spans


def regex_sentence_spans(text: str) -> list[Span]:
    """Sentence spans from the regex `(?<=[.!?])\\s+|\\n+` (whitespace after . ! ? or newlines)."""
    return _split_between(text, 0, len(text), _REGEX_BREAK)


@lru_cache(maxsize=1)
def _punkt_tokenizer() -> Any | None:
    """An untrained Punkt tokenizer with the hand abbreviation set, or None without nltk."""
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError:
        return None
    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def punkt_available() -> bool:
    """Whether nltk's Punkt tokenizer can be used (else `sentence_spans` uses the regex)."""
    return _punkt_tokenizer() is not None


def sentence_spans(text: str, segmenter: Literal["punkt", "regex"] = "punkt") -> list[Span]:
    """Character spans [start, end) of the sentences of `text`, in order, whitespace excluded.

    punkt: NLTK Punkt spans further split at newlines; falls back to the regex splitter when
    nltk cannot be imported. regex: `regex_sentence_spans`.
    """
    tokenizer = _punkt_tokenizer() if segmenter == "punkt" else None
    if tokenizer is None:
        return regex_sentence_spans(text)
    spans: list[Span] = []
    for start, end in tokenizer.span_tokenize(text):
        spans.extend(_split_between(text, start, end, _NEWLINES))
    return spans


def token_segments(offsets: Sequence[Span], spans: Sequence[Span]) -> list[Span]:
    """Map sentence character spans to half-open token index ranges [start, end).

    A token belongs to the sentence containing its first character; a token starting in the
    whitespace between two sentences joins the following one, and one starting after the
    last sentence joins the last. The ranges cover every token exactly once, in order, and are
    never empty. With no spans (blank text) all tokens form one segment.
    """
    n = len(offsets)
    if n == 0:
        return []
    ends = sorted(end for _, end in spans)
    last = max(0, len(ends) - 1)
    segments: list[Span] = []
    current, seg_start = -1, 0
    for t, (char_start, _) in enumerate(offsets):
        sid = min(bisect.bisect_right(ends, char_start), last)
        if sid > current:
            if t > seg_start:
                segments.append((seg_start, t))
            current, seg_start = sid, t
    segments.append((seg_start, n))
    return segments


def _decoded_lengths(tokenizer: Any, ids: list[int]) -> tuple[str, list[int]]:
    """decode(ids) and len(decode(ids[:i + 1])) for every i.

    Decoding every prefix costs O(T^2). Instead the prefixes are decoded at anchors every
    `_DECODE_BLOCK` tokens and each block on its own; where decode(ids[:a]) + decode(ids[a:e])
    equals decode(ids[:e]) (a and e consecutive anchors; the usual case for byte-level BPE),
    a length inside the block is the anchor's length plus the block-local one. Blocks where
    that fails (a character split across the anchor, a decoder that strips a leading space)
    decode their full prefixes.
    """
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    batch = getattr(tokenizer, "batch_decode", None)

    def decode_all(seqs: list[list[int]]) -> list[str]:
        return batch(seqs, **kwargs) if batch else [tokenizer.decode(q, **kwargs) for q in seqs]

    anchors = [*range(0, len(ids), _DECODE_BLOCK), len(ids)]
    heads = ["", *decode_all([ids[:a] for a in anchors[1:]])]
    lengths: list[int] = []
    for j, (a, e) in enumerate(zip(anchors[:-1], anchors[1:], strict=True)):
        block = decode_all([ids[a : i + 1] for i in range(a, e)])
        if heads[j] + block[-1] == heads[j + 1]:
            lengths.extend(len(heads[j]) + len(piece) for piece in block)
        else:
            lengths.extend(len(piece) for piece in decode_all([ids[: i + 1] for i in range(a, e)]))
    return heads[-1], lengths


def token_char_offsets(tokenizer: Any, response_ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The decoded response and each token's character span in it.

    A token's end is the shortest decoded length of any prefix that includes it. Decoded
    prefix lengths need not grow monotonically (an incomplete byte-level BPE character can
    decode to several replacement characters that collapse into one), so this keeps the spans
    monotone and tiling the text. Special tokens decode to nothing and get empty spans.
    """
    ids = [int(i) for i in response_ids]
    if not ids:
        return "", []
    text, lengths = _decoded_lengths(tokenizer, ids)
    stable = list(accumulate(reversed(lengths), min))[::-1]
    starts = [0, *stable[:-1]]
    return text[: stable[-1]], list(zip(starts, stable, strict=True))


def segment_response(tokenizer: Any, response_ids: Sequence[int],
                     segmenter: Literal["punkt", "regex"] = "punkt") -> list[Span]:
    """Sentence segments of one response as token index ranges covering all its tokens."""
    text, offsets = token_char_offsets(tokenizer, response_ids)
    return token_segments(offsets, sentence_spans(text, segmenter))
