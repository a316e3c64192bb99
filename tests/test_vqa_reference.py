"""VQA accuracy, answer vocabulary and soft scores against the reference code itself.

The oracles below are transcriptions of the published code, kept apart from vlkd's
implementation (``vlkd.data.vqa``) and written from the reference files, statement by
statement:

* ``REF_CURRENT`` / ``REF_LEGACY``: the accuracy loop of GT-Vision-Lab/VQA
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` ``VQAEval.evaluate`` at commit a013f00
  (2021-03-11, "Fixed processing answers bug") and at its parent a4f1afd (the file as of
  458a8b2, 2016-10-08), with ``processPunctuation`` and ``processDigitArticle``;
* ``filter_answers`` / ``compute_target`` / ``get_score`` / ``preprocess_answer``:
  hengyuan-hu/bottom-up-attention-vqa ``tools/compute_softscore.py`` at 3925206;
* ``oscar_answer_of_output``: microsoft/Oscar ``oscar/run_vqa.py`` (``get_labels``,
  ``label_map``, the ``label2ans[labels[idx]]`` of its test loop) at 266075f.

The tables (contractions, number words, articles, punctuation) are read from
``fixtures/vqa_reference_tables.json``, extracted from those files. Where Python 3 differs from
the Python 2 the reference runs on, the transcription says how it keeps Python 2's behaviour.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import pytest

from vlkd.data.captions import AnnotationError
from vlkd.data.vqa import (VQAQuestion, build_answer_vocab, load_answer_vocab,
                           multiple_choice_answers, soft_scores, vqa_accuracy,
                           vqa_question_accuracy)

TABLES = json.loads((Path(__file__).parent / "fixtures" / "vqa_reference_tables.json").read_text())


# ============================================================================================
# Transcription of vqaEval.py (GT-Vision-Lab/VQA). Python 2: a str pattern's \d is ASCII unless
# re.UNICODE is passed to compile, hence re.ASCII here.
# ============================================================================================
class _VQAEvalRef:
    def __init__(self):
        self.contractions = dict(TABLES["contractions"])
        self.manualMap = dict(TABLES["manual_map"])
        self.articles = list(TABLES["articles"])
        self.periodStrip = re.compile("(?!<=\\d)(\\.)(?!\\d)", re.ASCII)
        self.commaStrip = re.compile("(\\d)(\\,)(\\d)", re.ASCII)
        self.punct = list(TABLES["punct"])

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) != None):  # noqa: E501,E711
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
            else:
                pass
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = ' '.join(outText)
        return outText

    def _tail(self, gts, quesId, resAns, accQA, accAnsType, evalQA):
        # common to both versions (the per-question-type bookkeeping left out); evalQA keeps
        # avgGTAcc unrounded (the reference stores round(100 * avgGTAcc, 2) in setEvalQA)
        gtAcc = []
        for gtAnsDatum in gts[quesId]['answers']:
            otherGTAns = [item for item in gts[quesId]['answers'] if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item['answer'] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        ansType = gts[quesId]['answer_type']
        avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
        accQA.append(avgGTAcc)
        if ansType not in accAnsType:
            accAnsType[ansType] = []
        accAnsType[ansType].append(avgGTAcc)
        evalQA[quesId] = avgGTAcc

    def _result(self, accQA, accAnsType, evalQA):
        return {"overall": round(100 * float(sum(accQA)) / len(accQA), 2),
                "perAnswerType": {t: round(100 * float(sum(v)) / len(v), 2)
                                  for t, v in accAnsType.items()},
                "evalQA": evalQA}


class REF_CURRENT(_VQAEvalRef):
    """vqaEval.py at a013f00."""

    def evaluate(self, gts, res, quesIds):
        gts = copy.deepcopy(gts)  # the reference rewrites the answers in place
        accQA, accAnsType, evalQA = [], {}, {}
        for quesId in quesIds:
            for ansDic in gts[quesId]['answers']:
                ansDic['answer'] = ansDic['answer'].replace('\n', ' ')
                ansDic['answer'] = ansDic['answer'].replace('\t', ' ')
                ansDic['answer'] = ansDic['answer'].strip()
            resAns = res[quesId]['answer']
            resAns = resAns.replace('\n', ' ')
            resAns = resAns.replace('\t', ' ')
            resAns = resAns.strip()
            gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]

            if len(set(gtAnswers)) > 1:
                for ansDic in gts[quesId]['answers']:
                    ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                    ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
                resAns = self.processPunctuation(resAns)
                resAns = self.processDigitArticle(resAns)
            self._tail(gts, quesId, resAns, accQA, accAnsType, evalQA)
        return self._result(accQA, accAnsType, evalQA)


class REF_LEGACY(_VQAEvalRef):
    """vqaEval.py before a013f00 (a4f1afd; last changed in 458a8b2)."""

    def evaluate(self, gts, res, quesIds):
        gts = copy.deepcopy(gts)
        accQA, accAnsType, evalQA = [], {}, {}
        for quesId in quesIds:
            resAns = res[quesId]['answer']
            resAns = resAns.replace('\n', ' ')
            resAns = resAns.replace('\t', ' ')
            resAns = resAns.strip()
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)
            gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]
            if len(set(gtAnswers)) > 1:
                for ansDic in gts[quesId]['answers']:
                    ansDic['answer'] = self.processPunctuation(ansDic['answer'])
            self._tail(gts, quesId, resAns, accQA, accAnsType, evalQA)
        return self._result(accQA, accAnsType, evalQA)


# ============================================================================================
# Generated cases
# ============================================================================================
BASES = ["yes", "no", "2", "two", "10", "ten", "none", "0", "red", "a dog", "the cat", "an apple",
         "dont", "don't", "cant know", "im here", "whats that", "black and white", "1,000",
         "2.5", "3.", "t-shirt", "left/right", "hot dog!", "what?", "cat's toy", "yes.", "(red)",
         "a", "ice cream cone", "12:30", "oclock", "\"quoted\"", "e.g. this", "up, down",
         "x" + "." * 40 + "y", "x" + "." * 33 + "y", "x.y", "xy", "ñandú", "ZERO", "One",
         "The Dog", "Im", "isnt", "twas"]


def _variant(rng: random.Random, base: str) -> str:
    """A human might type it so: case, surrounding whitespace, punctuation, articles."""
    s = base
    u = rng.random()
    if u < 0.15:
        s = s.upper()
    elif u < 0.3:
        s = s.capitalize()
    u = rng.random()
    if u < 0.12:
        s = s + rng.choice([".", "!", "?", ",", " .", ";", "..."])
    elif u < 0.2:
        s = rng.choice(["a ", "the ", "an "]) + s
    elif u < 0.32:
        s = s.replace(" ", rng.choice(["  ", "-", "/", " , ", "\t", "\n", " \t"]))
    u = rng.random()
    if u < 0.12:
        s = rng.choice([" ", "  ", "\t", "\n", " \t"]) + s
    elif u < 0.24:
        s = s + rng.choice([" ", "\t", "\n", "  "])
    return s


def _cases(n: int, seed: int = 0) -> list[tuple[str, list[str], str]]:
    """(prediction, 10 human answers, answer type)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:       # unanimous, the very same string ten times
            answers = [_variant(rng, rng.choice(BASES))] * 10
        elif kind == 1:     # unanimous but for whitespace (around or inside)
            a = rng.choice([b for b in BASES if " " in b] if rng.random() < 0.5 else BASES)
            odd = rng.choice([" " + a, "\t" + a, a + "\n", a.replace(" ", "\t"),
                              a.replace(" ", "\n")])
            answers = [a] * 9 + [odd]
            rng.shuffle(answers)
        elif kind == 2:     # one answer typed many ways
            a = rng.choice(BASES)
            answers = [_variant(rng, a) for _ in range(10)]
        else:               # split between two to four answers
            picks = rng.sample(BASES, rng.randint(2, 4))
            answers = [_variant(rng, rng.choice(picks)) for _ in range(10)]
        u = rng.random()
        if u < 0.6:
            pred = _variant(rng, rng.choice(answers).strip() or "yes")
        elif u < 0.8:
            pred = rng.choice(answers)
        else:
            pred = _variant(rng, rng.choice(BASES))
        out.append((pred, answers, rng.choice(["yes/no", "number", "other"])))
    return out


CASES = _cases(600)


def _as_reference_input(cases):
    gts = {qid: {"answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                             for j, a in enumerate(answers)],
                 "question_type": "what", "answer_type": atype}
           for qid, (_, answers, atype) in enumerate(cases)}
    res = {qid: {"answer": pred, "question_id": qid} for qid, (pred, _, _) in enumerate(cases)}
    return gts, res


@pytest.mark.parametrize("metric, ref", [("current", REF_CURRENT), ("legacy", REF_LEGACY)])
def test_per_question_accuracy_equals_the_reference_code(metric, ref):
    gts, res = _as_reference_input(CASES)
    want = ref().evaluate(gts, res, list(gts))
    for qid, (pred, answers, _) in enumerate(CASES):
        got = vqa_question_accuracy(pred, answers, metric)
        assert got == want["evalQA"][qid], (metric, pred, answers)
    # the whole set as the evaluator prints it (rounded to 2 decimals)
    qs = [VQAQuestion(qid, "1", "?", answers, atype) for qid, (_, answers, atype) in
          enumerate(CASES)]
    r = vqa_accuracy({qid: pred for qid, (pred, _, _) in enumerate(CASES)}, qs, metric)
    assert round(r["accuracy"], 2) == want["overall"]
    assert {t: round(v, 2) for t, v in r["per_answer_type"].items()} == want["perAnswerType"]


def test_the_generated_cases_cover_what_the_versions_disagree_on():
    gts, res = _as_reference_input(CASES)
    cur = REF_CURRENT().evaluate(gts, res, list(gts))["evalQA"]
    leg = REF_LEGACY().evaluate(gts, res, list(gts))["evalQA"]
    differ = [q for q in cur if cur[q] != leg[q]]
    values = set(cur.values()) | set(leg.values())
    assert len(CASES) >= 500 and len(differ) >= 50, len(differ)
    assert {0.0, 1.0} <= values and len(values) >= 6          # partial credit both ways
    unanimous = sum(len(set(a)) == 1 for _, a, _ in CASES)
    assert unanimous >= 100 and len(CASES) - unanimous >= 300
    joined = "".join(p + "".join(a) for p, a, _ in CASES)
    for piece in ("\t", "\n", ",", ".", "?", "two", "the ", "dont", "Im", "." * 33):
        assert piece in joined, piece


def test_hand_checked_cases_of_each_version():
    """A few cases read off the two versions' code by hand (see the module docstring)."""
    # periodStrip.sub("", s, re.UNICODE) passes re.UNICODE = 32 as the count: "x" + 33 periods
    # + "y" keeps one period ("x.y"), while a lone period between letters goes ("x.y" -> "xy")
    long = "x" + "." * 33 + "y"
    for metric in ("current", "legacy"):
        humans = [long] * 3 + ["z"] * 7
        assert vqa_question_accuracy(long, humans, metric) == pytest.approx(0.9)
        assert vqa_question_accuracy("xy", humans, metric) == 0.0    # 0.9 without the count
        assert vqa_question_accuracy("x.y", humans, metric) == 0.0
    # current: whitespace-only differences make the humans unanimous, so nothing is normalised
    assert vqa_question_accuracy("Yes", ["yes"] * 9 + [" yes"], "current") == 0.0
    # legacy: the prediction is normalised, the answers differ (" yes") so lose punctuation
    # only, and " yes" (unstripped) never equals "yes": 9 matches
    assert vqa_question_accuracy("Yes", ["yes"] * 9 + [" yes"], "legacy") == pytest.approx(
        (9 * 1.0 + 1 * 1.0) / 10)


# ============================================================================================
# Transcription of tools/compute_softscore.py (hengyuan-hu/bottom-up-attention-vqa). Its
# process_punctuation / process_digit_article are vqaEval.py's, with the same tables.
# ============================================================================================
_REF = _VQAEvalRef()


def get_score(occurences):
    if occurences == 0:
        return 0
    elif occurences == 1:
        return 0.3
    elif occurences == 2:
        return 0.6
    elif occurences == 3:
        return 0.9
    else:
        return 1


def preprocess_answer(answer):
    answer = _REF.processDigitArticle(_REF.processPunctuation(answer))
    answer = answer.replace(',', '')
    return answer


def filter_answers(answers_dset, min_occurence):
    occurence = {}

    for ans_entry in answers_dset:
        gtruth = ans_entry['multiple_choice_answer']
        gtruth = preprocess_answer(gtruth)
        if gtruth not in occurence:
            occurence[gtruth] = set()
        occurence[gtruth].add(ans_entry['question_id'])
    for answer in list(occurence.keys()):  # Python 2's keys() is a list: popping is safe
        if len(occurence[answer]) < min_occurence:
            occurence.pop(answer)
    return occurence


def compute_target(answers_dset, ans2label):
    target = []
    for ans_entry in answers_dset:
        answers = ans_entry['answers']
        answer_count = {}
        for answer in answers:
            answer_ = answer['answer']
            answer_count[answer_] = answer_count.get(answer_, 0) + 1

        labels = []
        scores = []
        for answer in answer_count:
            if answer not in ans2label:
                continue
            labels.append(ans2label[answer])
            score = get_score(answer_count[answer])
            scores.append(score)
        target.append({'question_id': ans_entry['question_id'], 'labels': labels,
                       'scores': scores})
    return target


def _annotations(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    pool = BASES + ["blue", "green", "3", "three", "4", "frisbee", "1,000", "1000"]
    weights = [rng.random() ** 3 for _ in pool]
    anns = []
    for qid in range(n):
        mc = rng.choices(pool, weights)[0]
        humans = [_variant(rng, mc) if rng.random() < 0.6 else rng.choices(pool, weights)[0]
                  for _ in range(10)]
        anns.append({"question_id": 1000 + qid, "image_id": qid // 3,
                     "multiple_choice_answer": _variant(rng, mc),
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(humans)]})
    return anns


def test_answer_vocabulary_is_filter_answers_over_train_and_val(tmp_path):
    train, val = _annotations(400, seed=1), _annotations(300, seed=2)
    for a in val:
        a["question_id"] += 100_000
    val.append(dict(train[0]))      # a question in both files counts once (a set of ids)
    for name, anns in (("train", train), ("val", val)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"annotations": anns}))
    for min_count in (1, 3, 9, 20):
        want = filter_answers(train + val, min_count)
        got = build_answer_vocab(multiple_choice_answers([tmp_path / "train.json",
                                                          tmp_path / "val.json"]), min_count)
        assert sorted(got) == sorted(want) and len(got) == len(set(got))
        # vlkd's order: most questions first, then alphabetical
        assert got == sorted(want, key=lambda a: (-len(want[a]), a))
    assert len(filter_answers(train + val, 9)) >= 10


def test_soft_scores_equal_compute_target():
    anns = _annotations(300, seed=3)
    vocab = sorted(filter_answers(anns, 2))
    ans2label = {a: i for i, a in enumerate(vocab)}
    for ref in compute_target(anns, ans2label):
        ann = next(a for a in anns if a["question_id"] == ref["question_id"])
        got = soft_scores([x["answer"] for x in ann["answers"]])   # defaults: butd, raw
        mine = {ans2label[a]: s for a, s in got.items() if a in ans2label}
        assert mine == dict(zip(ref["labels"], ref["scores"]))
    # get_score is the accuracy of an answer that n of ten humans gave, averaged over the ten
    # leave-one-out subsets (the metric's min(#matches / 3, 1))
    for n in range(11):
        mean = (n * min((n - 1) / 3, 1) + (10 - n) * min(n / 3, 1)) / 10
        assert get_score(n) == pytest.approx(mean)
        assert soft_scores(["a"] * n + ["b"] * (10 - n)).get("a", 0) == get_score(n)


# ============================================================================================
# Oscar's / bottom-up's answer pickles: the classifier order, the restricted unpickler
# ============================================================================================
def oscar_answer_of_output(ans2label: dict, label2ans: list, idx: int) -> str:
    """microsoft/Oscar oscar/run_vqa.py: VQATextProcessor.get_labels returns
    list(ans2label.values()); the dataset maps label_map = {label: i for i, label in
    enumerate(labels)} (output i is label labels[i]); the test loop writes
    label2ans[eval_dataset.labels[idx]]."""
    labels = list(ans2label.values())
    return label2ans[labels[idx]]


def _scrambled_vocab(n: int = 40, seed: int = 5):
    """ans2label / label2ans as create_ans2label writes them, with ans2label stored in another
    order than its labels (bottom-up pickled a Python 2 dict: hash order)."""
    rng = random.Random(seed)
    label2ans = [f"answer {i}" for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    ans2label = {label2ans[i]: i for i in order}
    return ans2label, label2ans


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_ans2label_gives_oscars_classifier_order(tmp_path, protocol):
    ans2label, label2ans = _scrambled_vocab()
    (tmp_path / "trainval_ans2label.pkl").write_bytes(pickle.dumps(ans2label, protocol=protocol))
    (tmp_path / "trainval_label2ans.pkl").write_bytes(pickle.dumps(label2ans, protocol=protocol))
    answers = load_answer_vocab(tmp_path / "trainval_ans2label.pkl")
    assert answers == [oscar_answer_of_output(ans2label, label2ans, i)
                       for i in range(len(ans2label))]
    assert answers != label2ans                       # the two orders really differ here
    assert load_answer_vocab(tmp_path / "trainval_label2ans.pkl") == label2ans


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_answer_pickles_admit_only_dicts_lists_strings_ints(tmp_path):
    marker = tmp_path / "it-ran"
    bad = {
        "global.pkl": pickle.dumps({"yes": 0, "no": _Evil(str(marker))}, protocol=2),
        "ordered.pkl": pickle.dumps(OrderedDict([("yes", 0), ("no", 1)]), protocol=0),
        "float.pkl": pickle.dumps({"yes": 0, "no": 1.0}),
        "tuple.pkl": pickle.dumps(("yes", "no")),
        "bool.pkl": pickle.dumps({"yes": True}),
        "none.pkl": pickle.dumps(["yes", None]),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AnnotationError, match="refused|expected an ans2label") as e:
            load_answer_vocab(tmp_path / name)
        assert "dicts, lists, strings and integers" in str(e.value) or "expected" in str(e.value)
    assert not marker.exists()                       # the disallowed global never ran
    with pytest.raises(AnnotationError, match=r"refers to (posix|os|nt)\.mkdir"):
        load_answer_vocab(tmp_path / "global.pkl")
    with pytest.raises(AnnotationError, match=r"collections\.OrderedDict"):
        load_answer_vocab(tmp_path / "ordered.pkl")
    # well-formed but wrong: labels not 0..N-1, a duplicated answer
    (tmp_path / "gap.pkl").write_bytes(pickle.dumps({"yes": 0, "no": 2}))
    with pytest.raises(AnnotationError, match="0..N-1"):
        load_answer_vocab(tmp_path / "gap.pkl")
    (tmp_path / "dup.pkl").write_bytes(pickle.dumps(["yes", "no", "yes"]))
    with pytest.raises(AnnotationError, match="'yes' appears twice"):
        load_answer_vocab(tmp_path / "dup.pkl")
