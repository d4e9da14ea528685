"""Sentence spans and their token ranges (release rule, step 2)."""

from __future__ import annotations

import pytest

from opdcli import segments
from opdcli.segments import (
    regex_sentence_spans,
    segment_response,
    sentence_spans,
    token_char_offsets,
    token_segments,
)

TOY = r"3*7=21. 16*3=48. 48*7=336. 10+4=14. \boxed{-2642}"
TOY_STEPS = ["3*7=21.", "16*3=48.", "48*7=336.", "10+4=14.", r"\boxed{-2642}"]


def _texts(text, spans):
    return [text[a:b] for a, b in spans]


def _assert_tiles(segs, n):
    assert segs[0][0] == 0 and segs[-1][1] == n
    assert all(a < b for a, b in segs)
    assert all(segs[i][1] == segs[i + 1][0] for i in range(len(segs) - 1))


@pytest.mark.parametrize("segmenter", ["punkt", "regex"])
def test_toy_response_splits_into_its_steps(segmenter):
    assert _texts(TOY, sentence_spans(TOY, segmenter)) == TOY_STEPS


def test_decimals_and_abbreviations_do_not_split():
    text = "So x = 3.5 is wrong! Mr. Smith agrees, e.g. the answer is 2.25 approx. here. Done."
    assert _texts(text, sentence_spans(text)) == [
        "So x = 3.5 is wrong!", "Mr. Smith agrees, e.g. the answer is 2.25 approx. here.", "Done."]


@pytest.mark.parametrize("segmenter", ["punkt", "regex"])
def test_newlines_split(segmenter):
    text = "first line\nsecond line. Third\n\n  fourth"
    assert _texts(text, sentence_spans(text, segmenter)) == ["first line", "second line.", "Third", "fourth"]


def test_regex_fallback_spans():
    text = "  a = 3.5 * 2.  Why? Because!\nb e.g. c\n\n"
    assert _texts(text, regex_sentence_spans(text)) == ["a = 3.5 * 2.", "Why?", "Because!", "b e.g.", "c"]
    assert regex_sentence_spans("") == [] and regex_sentence_spans(" \n ") == []


def test_without_nltk_punkt_falls_back_to_the_regex(monkeypatch):
    text = "Mr. Smith came. He left."
    assert len(sentence_spans(text)) == 2
    monkeypatch.setattr(segments, "_punkt_tokenizer", lambda: None)
    assert sentence_spans(text) == regex_sentence_spans(text)
    assert len(sentence_spans(text)) == 3


def test_token_segments_with_the_char_tokenizer(toy_tokenizer):
    ids = toy_tokenizer.encode(TOY, add_special_tokens=False)
    text, offsets = token_char_offsets(toy_tokenizer, ids)
    assert text == TOY and offsets == [(i, i + 1) for i in range(len(TOY))]
    segs = segment_response(toy_tokenizer, ids)
    _assert_tiles(segs, len(ids))
    # the space between two steps starts the following segment
    assert _texts(TOY, segs) == [TOY_STEPS[0]] + [" " + s for s in TOY_STEPS[1:]]
    # a trailing special token decodes to nothing and joins the last segment
    with_eos = segment_response(toy_tokenizer, ids + [toy_tokenizer.eos_token_id])
    assert with_eos[:-1] == segs[:-1] and with_eos[-1] == (segs[-1][0], len(ids) + 1)


def test_token_segments_multichar_tokens():
    text = "Hi there. Ok.\nNext one."
    # tokens: "Hi" " there" ". " "Ok" ".\n" "Next" " one" "."  plus an empty (special) token
    offsets = [(0, 2), (2, 8), (8, 10), (10, 12), (12, 14), (14, 18), (18, 22), (22, 23), (23, 23)]
    spans = sentence_spans(text)
    assert _texts(text, spans) == ["Hi there.", "Ok.", "Next one."]
    segs = token_segments(offsets, spans)
    assert segs == [(0, 3), (3, 5), (5, 9)]
    _assert_tiles(segs, len(offsets))


def test_token_segments_edges():
    assert token_segments([], [(0, 3)]) == []
    assert token_segments([(0, 1), (1, 2)], []) == [(0, 2)]  # blank text: one segment
    # leading whitespace joins the first sentence; a sentence inside one token makes no empty segment
    assert token_segments([(0, 2), (2, 9), (9, 10)], [(1, 3), (4, 6), (7, 10)]) == [(0, 2), (2, 3)]
    # whitespace-only tokens between sentences open the next segment
    assert token_segments([(0, 3), (3, 4), (4, 5), (5, 8)], [(0, 3), (5, 8)]) == [(0, 1), (1, 4)]


class _ByteLikeTokenizer:
    """A character split over two tokens decodes to two replacement characters until complete,
    so decoded prefix lengths are not monotone (4 chars after 2 tokens, 3 after 3)."""

    pieces = {0: "ab", 1: "\x00", 2: "\x01", 3: ". ", 4: "cd."}

    def decode(self, ids, **kwargs):
        out = "".join(self.pieces[i] for i in ids)
        out = out.replace("\x00\x01", "é")
        return out.replace("\x00", "\ufffd\ufffd")


def test_offsets_stay_monotone_when_a_partial_character_collapses():
    text, offsets = token_char_offsets(_ByteLikeTokenizer(), [0, 1, 2, 3, 4])
    assert text == "abé. cd."
    assert offsets == [(0, 2), (2, 3), (3, 3), (3, 5), (5, 8)]
    assert segment_response(_ByteLikeTokenizer(), [0, 1, 2, 3, 4]) == [(0, 4), (4, 5)]


@pytest.mark.parametrize("block", [1, 2, 3])
def test_blockwise_decoding_matches_decoding_every_prefix(monkeypatch, toy_tokenizer, block):
    toy_ids = toy_tokenizer.encode(TOY, add_special_tokens=False) + [toy_tokenizer.eos_token_id]
    cases = [(_ByteLikeTokenizer(), [0, 1, 2, 3, 4, 0, 1, 2, 4]), (toy_tokenizer, toy_ids)]
    want = [token_char_offsets(tok, ids) for tok, ids in cases]  # one block: every prefix decoded
    monkeypatch.setattr(segments, "_DECODE_BLOCK", block)
    assert [token_char_offsets(tok, ids) for tok, ids in cases] == want
