"""VQA v2 annotations: questions + annotations JSON, answer vocabulary, soft scores, the
official answer normalisation and the official accuracy (GT-Vision-Lab ``vqaEval.py``), so that
training targets and the evaluation metric see answers the same way."""
from __future__ import annotations

import re
from collections import Counter
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
# group a no-op look-ahead); we keep it as is so scores match the official evaluator.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
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
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles,
    restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official evaluator normalises a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


# --- official accuracy (vqaEval.py) ------------------------------------------------------
def vqa_question_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official accuracy of one predicted answer against the human answers (usually 10).

    The prediction is normalised (punctuation, digits, articles, contractions); the human answers
    get the punctuation step when they disagree, as in the official evaluator. For each human
    answer, acc = min(1, #matches among the *other* answers / 3); the question's accuracy is the
    mean over those leave-one-out subsets.
    """
    if not human_answers:
        raise ValueError("VQA accuracy needs the question's human answers; found none (is this "
                         "a test split without annotations?)")
    pred = normalize_answer(prediction)
    gts = list(human_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: dict[int, str], questions) -> dict:
    """Mean official accuracy (in %, as the evaluator prints it) over annotated questions.

    Args:
        predictions: question id -> predicted answer string.
        questions: iterable of :class:`VQAQuestion` with answers.
    Returns:
        ``{"accuracy": float, "per_answer_type": {type: float}, "num_questions": int}``.
    """
    per_type: dict[str, list[float]] = {}
    all_acc = []
    missing = []
    for q in questions:
        if q.question_id not in predictions:
            missing.append(q.question_id)
            continue
        acc = vqa_question_accuracy(predictions[q.question_id], q.answers)
        all_acc.append(acc)
        per_type.setdefault(q.answer_type or "all", []).append(acc)
    if missing:
        raise ValueError(f"VQA predictions are missing {len(missing)} questions (e.g. "
                         f"{missing[:3]}); the official metric needs an answer for every one")
    if not all_acc:
        raise ValueError("no annotated questions to score")
    return {
        "accuracy": 100.0 * sum(all_acc) / len(all_acc),
        "per_answer_type": {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_type.items())},
        "num_questions": len(all_acc),
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
        adata = _load_json(annotations_path)
        if not isinstance(adata, dict) or "annotations" not in adata:
            raise AnnotationError(f"{annotations_path}: expected a VQA v2 annotations file "
                                  "with an 'annotations' list")
        missing = 0
        for a in adata["annotations"]:
            q = qs.get(int(a["question_id"]))
            if q is None:
                missing += 1
                continue
            q.answers = [x["answer"] for x in a["answers"]]
            q.answer_type = a.get("answer_type", "")
            q.question_type = a.get("question_type", "")
        if missing:
            raise AnnotationError(f"{annotations_path}: {missing} annotations name questions "
                                  f"not in {questions_path}; are these files of the same split?")
    return [qs[k] for k in sorted(qs)]


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Soft target per distinct (normalised) answer: min(#humans who gave it / 3, 1)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: min(n / 3.0, 1.0) for a, n in counts.items()}


def build_answer_vocab(questions: list[VQAQuestion], min_count: int = 9) -> list[str]:
    """Answer vocabulary: normalised answers given at least ``min_count`` times over the
    training answers (Oscar/bottom-up use 9 on VQA v2 → ~3,129 answers), sorted by
    decreasing frequency then alphabetically."""
    counts = Counter(normalize_answer(a) for q in questions for a in q.answers)
    vocab = [a for a, n in counts.items() if n >= min_count]
    vocab.sort(key=lambda a: (-counts[a], a))
    if not vocab:
        raise AnnotationError(f"no answer occurs {min_count}+ times; lower the minimum count")
    return vocab


def question_type_prior(train: list[VQAQuestion], questions: list[VQAQuestion]
                        ) -> dict[int, str]:
    """A model-free baseline: each question answered with the most frequent (normalised) human
    answer of its ``question_type`` in ``train`` (ties: the alphabetically first), or of all of
    ``train`` for a type ``train`` lacks. Returns question id -> answer, for the VQA metric."""
    by_type: dict[str, Counter] = {}
    overall: Counter = Counter()
    for q in train:
        answers = [normalize_answer(a) for a in q.answers]
        by_type.setdefault(q.question_type, Counter()).update(answers)
        overall.update(answers)
    if not overall:
        raise ValueError("question_type_prior: the training questions carry no answers; load "
                         "them with their annotations file")

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    best = {t: top(c) for t, c in by_type.items()}
    fallback = top(overall)
    return {q.question_id: best.get(q.question_type, fallback) for q in questions}
