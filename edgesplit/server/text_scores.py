"""Corpus scores of generated text against several references per input (E2E-style data), from kept libraries.

    hypotheses[i], references[i] (one or more)
        ──> BLEU-4 and chrF: sacrebleu (Post, 2018), lower-cased, its default 13a tokenizer, all references;
            BLEU without smoothing (a corpus with no matching 4-gram scores 0), as the E2E challenge reports it
        ──> NIST-5: nltk's corpus_nist (Doddington, 2002) on lower-cased whitespace tokens, all references
            (up to the longest hypothesis's length when every hypothesis is shorter than 5 words)
        ──> ROUGE-L F1: rouge-score (Lin, 2004), the best reference of each input, averaged over the inputs

BLEU, chrF and NIST are on sacrebleu's and nltk's own scales (BLEU and chrF 0-100). METEOR is left out: nltk's
needs the WordNet data, which is a download at first use. Server side only: the edge client never scores.
"""

from __future__ import annotations

from collections.abc import Sequence

SCORES = ("bleu", "chrf", "nist", "rouge_l")


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream j holds every input's j-th reference, None where an input has fewer."""
    depth = max((len(refs) for refs in references), default=0)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(depth)]


def check_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("there is nothing to score: no hypotheses")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    check_inputs(hypotheses, references)
    streams = reference_streams(references)
    # force: E2E's text comes tokenised (" ." and " ,"), which sacrebleu would warn about on every call.
    score = sacrebleu.corpus_bleu(
        list(hypotheses),
        streams,  # type: ignore[arg-type]  # sacrebleu annotates the streams without their None padding
        lowercase=True,
        smooth_method="none",
        force=True,
    )
    return float(score.score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    check_inputs(hypotheses, references)
    streams = reference_streams(references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), streams).score)  # type: ignore[arg-type]


def corpus_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    from nltk.translate.nist_score import corpus_nist as nist

    check_inputs(hypotheses, references)
    words = [h.lower().split() for h in hypotheses]
    # nltk divides by the count of each order's n-grams: orders longer than every hypothesis have none.
    orders = min(5, max(len(w) for w in words))
    if orders == 0:
        return 0.0
    return float(nist([[r.lower().split() for r in refs] for refs in references], words, n=orders))


def corpus_rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    from rouge_score import rouge_scorer

    check_inputs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = zip(hypotheses, references, strict=True)
    scores = [scorer.score_multi(list(refs), h)["rougeL"].fmeasure for h, refs in pairs]
    return float(sum(scores) / len(scores))


def text_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Every score of SCORES for one corpus."""
    return {
        "bleu": corpus_bleu(hypotheses, references),
        "chrf": corpus_chrf(hypotheses, references),
        "nist": corpus_nist(hypotheses, references),
        "rouge_l": corpus_rouge_l(hypotheses, references),
    }
