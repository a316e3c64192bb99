"""VQA accuracy against hand-computed cases; caption scores against pycocoevalcap run directly."""
import math

import pytest

from vlkd.data.vqa import (VQAQuestion, normalize_answer, soft_scores, vqa_accuracy,
                           vqa_question_accuracy)
from vlkd.train.metrics import caption_scores


def test_normalisation_matches_official_rules():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer(" A Red\tball ") == "red ball"
    assert normalize_answer("1,000") == "1000"          # comma between digits is removed
    assert normalize_answer("2.5") == "2.5"             # period between digits is kept


@pytest.mark.parametrize("pred, answers, expected", [
    # 10 identical answers: every leave-one-out subset has 9 matches -> 1.0
    ("yes", ["yes"] * 10, 1.0),
    # 3 of 10 match: leaving out a matching one leaves 2 (2/3), a non-matching one leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    ("2", ["2", "2"] + ["3"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3
    ("cat", ["cat"] + ["dog"] * 9, 0.3),
    # 0 matches
    ("bird", ["cat"] * 10, 0.0),
    # 4 of 10: (4 * 1 + 6 * 1) / 10 = 1.0
    ("no", ["no"] * 4 + ["yes"] * 6, 1.0),
])
@pytest.mark.parametrize("metric", ["current", "legacy"])
def test_question_accuracy_hand_computed(pred, answers, expected, metric):
    assert vqa_question_accuracy(pred, answers, metric) == pytest.approx(expected)


def test_the_two_versions_normalise_different_sides():
    # legacy (before a013f00): the human answers only lose punctuation, so a human "two" does
    # not match a predicted "2": 1 of 10 -> 0.3; current: the split answers are normalised
    # like the prediction, "two" -> "2": 2 of 10 -> 0.6
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_question_accuracy("2", answers, "legacy") == pytest.approx(0.3)
    assert vqa_question_accuracy("2", answers, "current") == pytest.approx(0.6)
    # legacy normalises the prediction whatever the answers; current leaves both sides as
    # they are (stripped) when the humans agree
    assert vqa_question_accuracy("Two", ["2"] * 10, "legacy") == pytest.approx(1.0)
    assert vqa_question_accuracy("Two", ["2"] * 10, "current") == 0.0
    assert vqa_question_accuracy(" two\t", ["two"] * 10, "current") == pytest.approx(1.0)
    for metric in ("current", "legacy"):
        assert vqa_question_accuracy("the cat.", ["cat"] * 3 + ["dog"] * 7,
                                     metric) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown VQA metric version 'v3'"):
        vqa_question_accuracy("cat", ["cat"], "v3")


def test_vqa_accuracy_mean_in_percent_and_missing_refused():
    qs = [VQAQuestion(1, "a", "?", ["yes"] * 10, "yes/no"),
          VQAQuestion(2, "a", "?", ["cat"] + ["dog"] * 9, "other")]
    r = vqa_accuracy({1: "yes", 2: "cat"}, qs)
    assert r["accuracy"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert r["per_answer_type"] == {"other": pytest.approx(30.0), "yes/no": pytest.approx(100.0)}
    assert r["vqa_metric"] == "current" and "a013f00" in r["vqa_metric_ref"]
    assert vqa_accuracy({1: "Yes", 2: "cat"}, qs, metric="legacy")["vqa_metric"] == "legacy"
    assert vqa_accuracy({1: "Yes", 2: "cat"}, qs)["accuracy"] == pytest.approx(15.0)
    with pytest.raises(ValueError, match="missing 1 questions"):
        vqa_accuracy({1: "yes"}, qs)


def test_soft_scores_rule():
    answers = ["red"] * 2 + ["Red."] + ["blue"] + ["green"] * 6
    # bottom-up's compute_target: answers as written, get_score 0.3 / 0.6 / 0.9 / 1
    assert soft_scores(answers) == {"red": 0.6, "Red.": 0.3, "blue": 0.3, "green": 1.0}
    assert soft_scores(answers, preprocess=True) == {"red": 0.9, "blue": 0.3, "green": 1.0}
    s = soft_scores(answers, scheme="linear", preprocess=True)
    assert s == {"red": 1.0, "blue": pytest.approx(1 / 3), "green": 1.0}
    assert soft_scores(["a cat", "cat", "dog", "dog"], scheme="linear", preprocess=True) == {
        "cat": pytest.approx(2 / 3), "dog": pytest.approx(2 / 3)}


@pytest.mark.slow
def test_caption_scores_equal_pycocoevalcap_direct():
    """Our wrapper must give exactly what pycocoevalcap's scorers give on the same input."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"1": ["a red circle left of a blue square", "a red ball beside a blue box"],
            "2": ["two green triangles", "a pair of green triangles on a white background"],
            "3": ["a yellow star", "one yellow star in the middle"]}
    preds = {"1": "a red circle next to a blue square", "2": "two green triangles",
             "3": "a blue star"}
    got = caption_scores(refs, preds, spice=False)

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    m = Meteor()
    meteor, _ = m.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    assert [got[f"Bleu_{i}"] for i in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert got["METEOR"] == pytest.approx(meteor, abs=1e-12)
    assert got["ROUGE_L"] == pytest.approx(rouge, abs=1e-12)
    assert got["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert all(math.isfinite(got[k]) for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"))
    assert 0 < got["CIDEr"] < 10


def test_caption_scores_refuse_unknown_ids():
    with pytest.raises(ValueError, match="no reference captions"):
        caption_scores({"1": ["x"]}, {"2": "y"}, spice=False)


def test_question_type_prior_answers_each_type_with_its_most_frequent_answer():
    from vlkd.data.vqa import question_type_prior

    def q(qid, qtype, answers):
        return VQAQuestion(qid, "1", "?", answers=answers, question_type=qtype)

    train = [q(1, "how many", ["2"] * 6 + ["3"] * 4),
             q(2, "how many", ["three"] * 10),        # normalised to "3": 14 × "3" vs 6 × "2"
             q(3, "is the", ["yes"] * 5 + ["no"] * 5),  # tie: alphabetically first, "no"
             q(4, "what color is the", ["Red."] * 10)]
    test = [q(10, "how many", ["3"] * 10), q(11, "is the", ["yes"] * 10),
            q(12, "what shape is", ["circle"] * 10)]  # unseen type: most frequent overall
    pred = question_type_prior(train, test)
    assert pred == {10: "3", 11: "no", 12: "3"}
    # counts over all of train: "3" 14, "red" 10, "2" 6, "no" 5, "yes" 5
    acc = vqa_accuracy(pred, test)
    assert acc["accuracy"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="carry no answers"):
        question_type_prior([q(1, "how many", [])], test)
