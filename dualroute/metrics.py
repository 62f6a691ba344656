"""Translation metrics: BLEU and chrF through sacrebleu, and phoneme / word error rates for G2P.

BLEU and chrF take detokenized text (what ``PairTokenizer.decode_tgt`` returns) and use sacrebleu's
defaults (BLEU: 13a tokenization, exp smoothing, mixed case; chrF2: character 6-grams), so the scores and
their signatures compare with published sacrebleu numbers.
"""

from __future__ import annotations

from typing import Any, Sequence


def _check_texts(hypotheses: Any, references: Any) -> None:
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] must be a string, got {type(texts[bad]).__name__}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (0-100) of one reference per hypothesis, with sacrebleu's signatures."""
    _check_texts(hypotheses, references)
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError as e:
        raise ImportError("BLEU / chrF need the optional `sacrebleu` package: "
                          "pip install 'dualroute[translate]'") from e
    bleu, chrf = BLEU(), CHRF()
    hyps, refs = list(hypotheses), [list(references)]
    return {"bleu": float(bleu.corpus_score(hyps, refs).score), "chrf": float(chrf.corpus_score(hyps, refs).score),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (unit cost insert / delete / substitute)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def error_rates(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """G2P scores as fractions (x100 for %): ``per`` = summed edit distance to the closest reference (fewest
    edits; the first such) over the summed length of those references; ``wer`` = share of words whose
    phonemes equal none of their references. ``references[i]`` lists word i's pronunciations (each a list
    of phonemes)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    edits = ref_len = wrong = 0
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if isinstance(hyp, str) or any(isinstance(r, str) for r in refs):
            raise TypeError(f"item {i}: hypotheses and references must be lists of phonemes, not strings "
                            "(split them on spaces)")
        if not refs or any(len(r) == 0 for r in refs):
            raise ValueError(f"item {i}: every word needs at least one non-empty reference")
        hyp = list(hyp)
        distance, closest = min(((edit_distance(hyp, r), n) for n, r in enumerate(refs)))
        edits += distance
        ref_len += len(refs[closest])
        wrong += distance != 0
    return {"per": edits / ref_len, "wer": wrong / len(hypotheses)}
