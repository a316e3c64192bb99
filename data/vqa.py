"""VQA v2 annotations: questions + annotations JSON, the answer vocabulary, soft scores, and the
official answer normalisation and accuracy, so that training targets and the evaluation metric
see answers the same way. Each rule follows a reference file to the letter (docs/TRAIN.md,
"Conventions"):

* accuracy: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, in its
  current form (commit a013f00, 2021-03-11, "Fixed processing answers bug": metric
  ``current``) and as it was before (commit 458a8b2, 2016: metric ``legacy``, which papers
  scored before 2021 used);
* vocabulary and soft scores: hengyuan-hu/bottom-up-attention-vqa
  ``tools/compute_softscore.py`` (``filter_answers``, ``preprocess_answer``, ``get_score``,
  ``compute_target``), where Oscar's VQA answer list and targets come from;
* Oscar's released ``trainval_ans2label.pkl`` / ``trainval_label2ans.pkl``: read through a
  restricted unpickler (dict, list, str, int only), in the classifier order of
  microsoft/Oscar ``oscar/run_vqa.py``.
"""
from __future__ import annotations

import pickle
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vlkd.data.captions import AnnotationError, _load_json

# --- official normalisation (vqaEval.py), kept verbatim in behaviour -------------------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official pattern is "(?!<=\d)(\.)(?!\d)" (a typo for a look-behind, which makes the first
# group a no-op look-ahead); we keep it as is so scores match the official evaluator. The
# evaluator is Python 2 code, where \d without re.UNICODE matches the ASCII digits only.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)
# Both reference files call periodStrip.sub("", outText, re.UNICODE): the third positional
# argument of sub is the count, so at most re.UNICODE = 32 periods are removed.
_PERIOD_MAX = 32
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space out punctuation, strip lone periods."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_MAX)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles,
    restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _strip(answer: str) -> str:
    """vqaEval.py's first step: newlines and tabs to spaces, then ``strip()``."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer normalised as the official evaluator normalises a predicted answer that it
    normalises (``strip``, ``processPunctuation``, ``processDigitArticle``)."""
    return process_digit_article(process_punctuation(_strip(answer)))


def preprocess_answer(answer: str) -> str:
    """bottom-up-attention-vqa's ``preprocess_answer``: punctuation, digits and articles as
    the evaluator, then every remaining comma removed. The answer vocabulary is made of these."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


# --- official accuracy (vqaEval.py) ------------------------------------------------------
#: The versions of the official accuracy: name -> the reference code it follows.
VQA_METRICS = {
    "current": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00 "
               "(2021-03-11, 'Fixed processing answers bug')",
    "legacy": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py before a013f00 "
              "(last changed in 458a8b2, 2016-10-08)",
}


def _check_metric(metric: str) -> None:
    if metric not in VQA_METRICS:
        raise ValueError(f"unknown VQA metric version {metric!r}; choose from "
                         f"{sorted(VQA_METRICS)} (current: the official evaluator since "
                         "2021-03-11; legacy: before it)")


def vqa_question_accuracy(prediction: str, human_answers: list[str],
                          metric: str = "current") -> float:
    """Official accuracy of one predicted answer against the human answers (usually 10).

    ``current`` (vqaEval.py since a013f00): every human answer and the prediction have their
    newlines and tabs turned into spaces and are stripped; then, only when the human answers
    are not all identical, all of them and the prediction go through ``processPunctuation``
    and ``processDigitArticle``. When they are identical neither side is normalised further.

    ``legacy`` (before a013f00): the prediction is stripped and fully normalised; the human
    answers are left as they are, except that ``processPunctuation`` is applied to them when
    they are not all identical (compared as given, unstripped).

    Both: for each human answer i, acc_i = min(1, #matches among the other answers / 3), and
    the question's accuracy is the mean of acc_i (the official ``item != gtAnsDatum`` leaves
    out exactly one answer, since VQA v2's answers carry distinct ``answer_id``).
    """
    _check_metric(metric)
    if not human_answers:
        raise ValueError("VQA accuracy needs the question's human answers; found none (is this "
                         "a test split without annotations?)")
    if metric == "current":
        gts = [_strip(a) for a in human_answers]
        res = _strip(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            res = process_digit_article(process_punctuation(res))
    else:
        res = normalize_answer(prediction)
        gts = list(human_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    matches = sum(a == res for a in gts)
    accs = [min(1, float(matches - (a == res)) / 3) for a in gts]
    return float(sum(accs)) / len(accs)


def vqa_accuracy(predictions: dict[int, str], questions, metric: str = "current") -> dict:
    """Mean official accuracy (in %, as the evaluator prints it) over annotated questions.

    The values are not rounded; the evaluator prints ``round(value, 2)`` of the same numbers.

    Args:
        predictions: question id -> predicted answer string.
        questions: iterable of :class:`VQAQuestion` with answers.
        metric: ``current`` or ``legacy`` (:data:`VQA_METRICS`).
    Returns:
        ``{"accuracy", "per_answer_type": {type: acc}, "per_question_type": {type: acc},
        "num_questions", "vqa_metric": metric, "vqa_metric_ref": its reference code}``.
    """
    _check_metric(metric)
    per_type: dict[str, list[float]] = {}
    per_qtype: dict[str, list[float]] = {}
    all_acc = []
    missing = []
    for q in questions:
        if q.question_id not in predictions:
            missing.append(q.question_id)
            continue
        acc = vqa_question_accuracy(predictions[q.question_id], q.answers, metric)
        all_acc.append(acc)
        per_type.setdefault(q.answer_type or "all", []).append(acc)
        per_qtype.setdefault(q.question_type or "all", []).append(acc)
    if missing:
        raise ValueError(f"VQA predictions are missing {len(missing)} questions (e.g. "
                         f"{missing[:3]}); the official metric needs an answer for every one")
    if not all_acc:
        raise ValueError("no annotated questions to score")

    def pct(v: list[float]) -> float:
        return 100.0 * sum(v) / len(v)
    return {
        "accuracy": pct(all_acc),
        "per_answer_type": {k: pct(v) for k, v in sorted(per_type.items())},
        "per_question_type": {k: pct(v) for k, v in sorted(per_qtype.items())},
        "num_questions": len(all_acc),
        "vqa_metric": metric,
        "vqa_metric_ref": VQA_METRICS[metric],
    }


# --- data ---------------------------------------------------------------------------------
@dataclass
class VQAQuestion:
    question_id: int
    image_id: str
    question: str
    answers: list[str] = field(default_factory=list)   # the (10) human answers, raw
    answer_type: str = ""
    question_type: str = ""
    multiple_choice_answer: str = ""


def load_vqa(questions_path: str | Path, annotations_path: str | Path | None = None
             ) -> list[VQAQuestion]:
    """Read VQA v2 questions (and, when given, their annotations), sorted by question id.

    Args:
        questions_path: ``v2_OpenEnded_mscoco_*_questions.json`` (``{"questions": [...]}``).
        annotations_path: ``v2_mscoco_*_annotations.json``; None for a test split.
    """
    qdata = _load_json(questions_path)
    if not isinstance(qdata, dict) or "questions" not in qdata:
        raise AnnotationError(f"{questions_path}: expected a VQA v2 questions file with a "
                              "'questions' list")
    qs = {int(q["question_id"]): VQAQuestion(int(q["question_id"]), str(q["image_id"]),
                                             q["question"]) for q in qdata["questions"]}
    if annotations_path is not None:
        missing = 0
        for a in _annotations(annotations_path):
            q = qs.get(int(a["question_id"]))
            if q is None:
                missing += 1
                continue
            q.answers = [x["answer"] for x in a["answers"]]
            q.answer_type = a.get("answer_type", "")
            q.question_type = a.get("question_type", "")
            q.multiple_choice_answer = a.get("multiple_choice_answer", "")
        if missing:
            raise AnnotationError(f"{annotations_path}: {missing} annotations name questions "
                                  f"not in {questions_path}; are these files of the same split?")
    return [qs[k] for k in sorted(qs)]


def _annotations(path: str | Path) -> list[dict]:
    adata = _load_json(path)
    if not isinstance(adata, dict) or "annotations" not in adata:
        raise AnnotationError(f"{path}: expected a VQA v2 annotations file with an "
                              "'annotations' list")
    return adata["annotations"]


# --- training targets (bottom-up-attention-vqa compute_softscore.py) ----------------------
#: Soft-score schemes: ``butd`` is ``get_score`` (0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, >= 4
#: humans: exactly the official accuracy of an answer that many of ten humans gave, averaged
#: over the ten leave-one-out subsets); ``linear`` is min(n / 3, 1).
SOFT_SCORES = ("butd", "linear")


def soft_score(count: int, scheme: str = "butd") -> float:
    """The target of an answer given by ``count`` humans (:data:`SOFT_SCORES`)."""
    if scheme == "butd":
        return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0
    if scheme == "linear":
        return min(count / 3.0, 1.0)
    raise ValueError(f"unknown soft-score scheme {scheme!r}; choose from {list(SOFT_SCORES)}")


def soft_scores(answers: list[str], *, scheme: str = "butd", preprocess: bool = False
                ) -> dict[str, float]:
    """Soft target per distinct human answer.

    By default as bottom-up-attention-vqa's ``compute_target``: the answers are counted as
    written in the annotations (it counts ``answer['answer']`` without preprocessing them,
    whatever its docstring says) and scored by ``get_score``.

    Args:
        answers: The human answers of one question.
        scheme: ``butd`` or ``linear`` (:data:`SOFT_SCORES`).
        preprocess: Count :func:`preprocess_answer` forms instead, so that a human "two"
            counts for the vocabulary's "2".
    """
    counts = Counter(preprocess_answer(a) if preprocess else a for a in answers)
    return {a: soft_score(n, scheme) for a, n in counts.items()}


# --- answer vocabulary ---------------------------------------------------------------------
def multiple_choice_answers(annotation_paths: Iterable[str | Path]) -> list[tuple[int, str]]:
    """``(question_id, multiple_choice_answer)`` of every annotation of the files, in order."""
    out = []
    for path in annotation_paths:
        for a in _annotations(path):
            if "multiple_choice_answer" not in a:
                raise AnnotationError(
                    f"{path}: annotation of question {a.get('question_id')} has no "
                    "'multiple_choice_answer', which the answer vocabulary is built from (VQA v2 "
                    "annotation files have one); pass a vocabulary as data.answer_vocab instead")
            out.append((int(a["question_id"]), str(a["multiple_choice_answer"])))
    return out


def build_answer_vocab(entries: Iterable[tuple[int, str]], min_count: int = 9) -> list[str]:
    """The answer vocabulary as bottom-up-attention-vqa's ``filter_answers`` builds it.

    Each ``multiple_choice_answer`` is preprocessed (:func:`preprocess_answer`); an answer
    enters when it is the answer of at least ``min_count`` distinct questions. bottom-up
    counts train + val with 9, which gives the 3,129 answers of ``trainval_ans2label.pkl``.

    Args:
        entries: ``(question_id, multiple_choice_answer)`` pairs
            (:func:`multiple_choice_answers`).
        min_count: ``min_occurence``.

    Returns:
        The answers by decreasing number of questions, then alphabetically (bottom-up's own
        order is its Python 2 dict's, which cannot be reproduced: to use a model trained on
        its list, read that list with :func:`load_answer_vocab`).
    """
    questions: dict[str, set[int]] = {}
    for qid, answer in entries:
        questions.setdefault(preprocess_answer(answer), set()).add(int(qid))
    vocab = [a for a, q in questions.items() if len(q) >= min_count]
    vocab.sort(key=lambda a: (-len(questions[a]), a))
    if not vocab:
        raise AnnotationError(f"no answer is the multiple-choice answer of {min_count}+ "
                              "questions; lower the minimum count (data.answer_min_count)")
    return vocab


class _AnswerUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without looking anything up: no class, no function."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to a persistent object")


def _disallowed(obj, depth: int = 0) -> str | None:
    """The first value that is not a dict/list/str/int (bool excluded), or None."""
    if type(obj) in (str, int):
        return None
    if type(obj) is list:
        return next((w for w in (_disallowed(x, depth + 1) for x in obj) if w), None)
    if type(obj) is dict:
        return next((w for w in (_disallowed(x, depth + 1) for kv in obj.items() for x in kv)
                     if w), None)
    return f"a {type(obj).__name__} ({obj!r:.40})"


def load_answer_vocab(path: str | Path) -> list[str]:
    """Answers by classifier index from Oscar's / bottom-up's pickles or a text file.

    * ``*.pkl`` holding a dict (``trainval_ans2label.pkl``, answer -> label): its keys in the
      stored order. That is the order of Oscar's classifier: ``run_vqa.py`` takes
      ``list(ans2label.values())`` as its label list and maps label ``labels[i]`` to output i,
      so output i is the i-th stored answer (bottom-up wrote the file from a Python 2 dict,
      whose order is not the labels').
    * ``*.pkl`` holding a list (``trainval_label2ans.pkl``, label -> answer): the answers by
      label, the order of bottom-up-attention-vqa's own classifier (not Oscar's, see above).
    * any other file: one answer per line (``answers.txt``).

    Pickles are read by a restricted unpickler that builds dicts, lists, strings and integers
    and refuses anything else (a class, a function, any other type) before it is built.
    """
    path = Path(path)
    if path.suffix != ".pkl":
        answers = [a for a in path.read_text(encoding="utf-8").split("\n") if a]
        if not answers:
            raise AnnotationError(f"answer vocabulary {path} is empty")
        return answers
    try:
        with open(path, "rb") as f:
            obj = _AnswerUnpickler(f, encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: refused: {e}; an answer pickle may hold only dicts, "
                              "lists, strings and integers (an ans2label dict or a label2ans "
                              "list); convert it to one answer per line if it is yours") from None
    bad = _disallowed(obj)
    if bad:
        raise AnnotationError(f"{path}: refused: it holds {bad}; an answer pickle may hold only "
                              "dicts, lists, strings and integers")
    if isinstance(obj, dict):
        answers, labels = list(obj), list(obj.values())
        if not all(isinstance(a, str) for a in answers) or sorted(labels) != list(range(len(obj))):
            raise AnnotationError(f"{path}: expected an ans2label dict (answer -> label 0..N-1, "
                                  "each label once)")
    elif isinstance(obj, list) and all(isinstance(a, str) for a in obj):
        answers = list(obj)
        if len(set(answers)) != len(answers):
            dup = next(a for a in answers if answers.count(a) > 1)
            raise AnnotationError(f"{path}: answer {dup!r} appears twice in the label2ans list")
    else:
        raise AnnotationError(f"{path}: expected an ans2label dict or a label2ans list of "
                              "strings")
    if not answers:
        raise AnnotationError(f"answer vocabulary {path} is empty")
    return answers


def question_type_prior(train: list[VQAQuestion], questions: list[VQAQuestion],
                        by: str = "question_type") -> dict[int, str]:
    """A model-free baseline: each question answered with the most frequent (normalised) human
    answer of its ``question_type`` in ``train`` (ties: the alphabetically first), or of all of
    ``train`` for a type ``train`` lacks. Returns question id -> answer, for the VQA metric.

    ``by="question"`` groups by the whole question text instead (a question ``train`` never
    asked falls back to its type's answer): the best a model reading only the question can
    do on questions it has seen."""
    if by not in ("question_type", "question"):
        raise ValueError(f"question_type_prior: by must be 'question_type' or 'question', got "
                         f"{by!r}")
    groups: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    overall: Counter = Counter()
    for q in train:
        answers = [normalize_answer(a) for a in q.answers]
        by_type.setdefault(q.question_type, Counter()).update(answers)
        groups.setdefault(getattr(q, by), Counter()).update(answers)
        overall.update(answers)
    if not overall:
        raise ValueError("question_type_prior: the training questions carry no answers; load "
                         "them with their annotations file")

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    best = {t: top(c) for t, c in by_type.items()}
    grouped = {t: top(c) for t, c in groups.items()}
    fallback = top(overall)
    return {q.question_id: grouped.get(getattr(q, by), best.get(q.question_type, fallback))
            for q in questions}
