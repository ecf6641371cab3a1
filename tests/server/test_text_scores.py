"""The library scores (sacrebleu, rouge-score, nltk) against the figures worked out by hand that the
project's former hand-written BLEU and ROUGE-L gave on the same examples."""

from __future__ import annotations

import math

import pytest

from edgesplit.server.text_scores import corpus_bleu, corpus_chrf, corpus_nist, corpus_rouge_l, text_scores


def test_identical_text_scores_full_marks() -> None:
    text = "the cat sat on the mat"
    scores = text_scores([text], [[text]])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["nist"] > 0


def test_bleu_by_hand() -> None:
    # candidate "the cat sat on the mat", reference "the cat is on the mat": 1-grams 5/6, 2-grams 3/5,
    # 3-grams 1/4, 4-grams 0/3. With a second, identical pair the corpus counts are 11/12, 8/10, 5/8, 3/6
    # and the lengths equal (no brevity penalty). Upper case in a candidate does not count (lower-cased).
    candidates = ["The cat sat on the mat", "a b c d e f"]
    references = [["the cat is on the mat"], ["a b c d e f"]]
    expected = math.exp((math.log(11 / 12) + math.log(8 / 10) + math.log(5 / 8) + math.log(3 / 6)) / 4)
    assert corpus_bleu(candidates, references) == pytest.approx(100 * expected)
    assert corpus_bleu(candidates[:1], references[:1]) == 0.0  # no matching 4-gram, no smoothing


def test_bleu_takes_every_reference_and_the_closest_length() -> None:
    # 4 words against references of 6 and 9 words (and a second input with one reference): r = 6 + 2,
    # c = 4 + 2, so BP = exp(1 - 8/6); every n-gram matches.
    hypotheses = ["a b c d", "x y"]
    references = [["a b c d e f", "a b c d e f g h i"], ["x y"]]
    assert corpus_bleu(hypotheses, references) == pytest.approx(100 * math.exp(1 - 8 / 6))
    # A match with the second reference only counts: the references are not just the first of each input.
    assert corpus_bleu(["p q r s"], [["a b c d", "p q r s"]]) == pytest.approx(100.0)


def test_bleu_clips_repeated_words() -> None:
    assert corpus_bleu(["the the the the"], [["the cat"]]) == 0.0


def test_rouge_l_by_hand() -> None:
    # LCS 3, P = 3/5, R = 3/4, F1 = 2/3; the best of the references counts, then the mean over inputs.
    assert corpus_rouge_l(["a b c d e"], [["x y", "a c e f"]]) == pytest.approx(2 / 3)
    assert corpus_rouge_l(["a b c d e", "q"], [["a c e f"], ["z"]]) == pytest.approx(1 / 3)


def test_chrf_and_nist_rank_a_closer_hypothesis_higher() -> None:
    references = [["there is a cheap coffee shop in the city centre ."]]
    close, far = ["there is a cheap coffee shop in the centre ."], ["pizza is served ."]
    assert corpus_chrf(close, references) > corpus_chrf(far, references) > 0
    assert corpus_nist(close, references) > corpus_nist(far, references)
    assert corpus_nist([""], references) == 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_rouge_l(["a"], [[]])
