"""BLEU and ROUGE-L against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from edgesplit.server.textmetrics import corpus_bleu, corpus_rouge_l, lcs_length, rouge_l


def test_identical_text_scores_one() -> None:
    text = "the cat sat on the mat"
    assert corpus_bleu([text], [[text]]) == pytest.approx(1.0)
    assert corpus_rouge_l([text], [[text]]) == pytest.approx(1.0)


def test_bleu_by_hand() -> None:
    # candidate "the cat sat on the mat" (6 words), reference "the cat is on the mat" (6 words):
    # 1-grams 5/6 (sat is unmatched), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat),
    # 4-grams 0/3 -> 0 without smoothing. Add a second, identical pair so that 4-grams match: the corpus
    # counts become 11/12, 8/10, 5/8, 3/6, and the lengths are equal (no brevity penalty).
    candidates = ["the cat sat on the mat", "a b c d e f"]
    references = [["the cat is on the mat"], ["a b c d e f"]]
    expected = math.exp((math.log(11 / 12) + math.log(8 / 10) + math.log(5 / 8) + math.log(3 / 6)) / 4)
    assert corpus_bleu(candidates, references) == pytest.approx(expected)
    assert corpus_bleu(candidates[:1], references[:1]) == 0.0


def test_bleu_brevity_penalty_and_closest_reference() -> None:
    # candidate of 4 words, references of 6 and 9 words: r = 6, c = 4, BP = exp(1 - 6/4); all n-grams match.
    candidate = "a b c d"
    refs = ["a b c d e f", "a b c d e f g h i"]
    assert corpus_bleu([candidate], [refs]) == pytest.approx(math.exp(1 - 6 / 4))


def test_bleu_clips_repeated_words() -> None:
    # "the the the the" against "the cat": 1-gram precision clipped to 1/4, so no higher n-gram matches: 0.
    assert corpus_bleu(["the the the the"], [["the cat"]]) == 0.0


def test_rouge_l_by_hand() -> None:
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # LCS 3, P = 3/5, R = 3/4, F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3; the best of the references counts.
    assert rouge_l("a b c d e", ["x y", "a c e f"]) == pytest.approx(2 / 3)
    assert corpus_rouge_l(["a b c d e", "q"], [["a c e f"], ["z"]]) == pytest.approx(1 / 3)
