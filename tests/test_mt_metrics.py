import math

import pytest

pytest.importorskip("sacrebleu")

from dualroute.metrics import bleu_chrf, edit_distance, error_rates  # noqa: E402


def test_identical_output_scores_100():
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    scores = bleu_chrf(refs, refs)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_bleu_of_a_hand_checked_pair():
    # Against "the cat sat on a mat" the hypothesis matches 5/6 unigrams, 3/5 bigrams, 2/4 trigrams and
    # 1/3 4-grams, with equal lengths (brevity penalty 1): BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    scores = bleu_chrf(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert scores["bleu"] == pytest.approx(53.7285, abs=1e-4)
    assert 0 < scores["chrf"] < 100


def test_brevity_penalty_and_no_overlap():
    # A correct 4-word prefix of a 6-word reference: all n-gram precisions 1, BP = exp(1 - 6/4).
    scores = bleu_chrf(["a b c d"], ["a b c d e f"])
    assert scores["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)
    assert bleu_chrf(["xyz"], ["abc def"])["bleu"] == pytest.approx(0.0)


def test_signatures_are_sacrebleus_standard_ones():
    import sacrebleu

    scores = bleu_chrf(["a b"], ["a b"])
    for key in ("nrefs:1", "tok:13a", "smooth:exp", "case:mixed", f"version:{sacrebleu.__version__}"):
        assert key in scores["bleu_signature"]
    for key in ("nrefs:1", "nc:6", "nw:0", f"version:{sacrebleu.__version__}"):
        assert key in scores["chrf_signature"]


def test_bleu_chrf_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu_chrf(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        bleu_chrf([], [])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] must be a string"):
        bleu_chrf(["a", ["b"]], ["a", "b"])
    with pytest.raises(TypeError, match="references must be a list of strings"):
        bleu_chrf(["a"], "a")


def test_edit_distance_known_cases():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], ["A", "B"]) == 2
    assert edit_distance(["A", "B"], []) == 2
    assert edit_distance(["AH0", "B"], ["AH0", "B"]) == 0


def test_error_rates_hand_computed():
    hyps = [["K", "AE1", "T"], ["D", "AO1", "G", "Z"], ["AH0"]]
    refs = [
        [["K", "AE1", "T"]],  # exact: 0 edits, length 3
        [["D", "AO1", "G"]],  # one insertion: 1 edit, length 3
        [["EY1"], ["AH0"]],  # equals its second reference: 0 edits, length 1
    ]
    rates = error_rates(hyps, refs)
    assert rates["per"] == pytest.approx(1 / 7)
    assert rates["wer"] == pytest.approx(1 / 3)


def test_error_rates_use_the_closest_reference():
    # 2 edits from the first reference (length 4), 1 from the second (length 2): the second counts.
    rates = error_rates([["A", "B", "C"]], [[["A", "X", "Y", "C"], ["A", "C"]]])
    assert rates == {"per": pytest.approx(1 / 2), "wer": 1.0}


def test_error_rates_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        error_rates([["A"], ["B"]], [[["A"]]])
    with pytest.raises(TypeError, match="item 0: .* not strings"):
        error_rates(["A B"], [[["A", "B"]]])
    with pytest.raises(ValueError, match="item 0: every word needs"):
        error_rates([["A"]], [[]])
