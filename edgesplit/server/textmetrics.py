"""Corpus BLEU-4 and ROUGE-L F1 in plain Python, for E2E-style data with several references per input.

BLEU (Papineni et al., 2002), as the E2E challenge and sacrebleu's defaults compute it on tokenised text:
clipped n-gram precisions for n = 1..4 summed over the corpus, their geometric mean, times the brevity
penalty exp(1 - r/c) when the candidates' total length c is below r, where r sums for each candidate the
reference length closest to its own (ties: the shorter). No smoothing: a corpus with no matching 4-gram
scores 0. ROUGE-L (Lin, 2004): the longest common subsequence with each reference, F1 = 2PR/(P+R) (beta 1),
the best over the references, averaged over the inputs. Tokens: lower-cased, split on whitespace.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def tokens(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU in [0, 1] of `candidates[i]` against the references `references[i]` (one or more each)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    matched = [0] * max_n
    total = [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        words = tokens(candidate)
        ref_words = [tokens(r) for r in refs]
        candidate_length += len(words)
        reference_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            most: Counter[tuple[str, ...]] = Counter()
            for r in ref_words:
                most |= _ngrams(r, n)  # max count of each n-gram over the references
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    if candidate_length == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / max_n
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, refs: Sequence[str]) -> float:
    """ROUGE-L F1 of one candidate: the best over its references."""
    words = tokens(candidate)
    best = 0.0
    for ref in refs:
        ref_words = tokens(ref)
        common = lcs_length(words, ref_words)
        if common:
            precision, recall = common / len(words), common / len(ref_words)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def corpus_rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    if not candidates:
        return 0.0
    return sum(rouge_l(c, r) for c, r in zip(candidates, references, strict=True)) / len(candidates)
