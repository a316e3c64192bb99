"""The text grammar of the synthetic world: captions, VQA questions with their true answer,
and the ten human answers each question gets (docs/SYNTHETIC.md, "The grammar").

Every function here reads a :class:`~vlkd.data.synthetic.scene.Scene` and draws from the
image's own generator, so the text is a pure function of ``(seed, split, index)`` too.
"""
from __future__ import annotations

import numpy as np

from .scene import COLORS, SHAPES, Scene, SceneObject

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = 5
ANSWERS_PER_QUESTION = 10


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: SceneObject, *, size: bool = False, color: bool = True, article: bool = True,
        size_word: str | None = None) -> str:
    """Noun phrase of one object: ``a small red circle``."""
    words = []
    if size and o.size != "medium":
        words.append(size_word or o.size)
    if color:
        words.append(o.color)
    words.append(o.shape)
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}" if article else phrase


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _count_np(n: int, noun_singular: str, noun_plural: str, adj: str = "") -> str:
    pre = f"{adj} " if adj else ""
    if n == 1:
        phrase = f"{pre}{noun_singular}"
        return f"{_article(phrase)} {phrase}"
    return f"{NUMBER_WORDS[n]} {pre}{noun_plural}"


def relation(a: SceneObject, b: SceneObject, short_side: int) -> str | None:
    """Where ``a`` is relative to ``b``: ``to the left of``, ``to the right of``, ``above``,
    ``below``, or None when the centres are too close or too diagonal to say."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if big < 0.12 * short_side or big < 1.5 * small:
        return None
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


def _location(o: SceneObject, w: int, h: int) -> str:
    col = 0 if o.center[0] < w / 3 else 2 if o.center[0] > 2 * w / 3 else 1
    row = 0 if o.center[1] < h / 3 else 2 if o.center[1] > 2 * h / 3 else 1
    return {(0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right "
            "corner", (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
            (2, 0): "in the bottom left corner", (2, 1): "at the bottom",
            (2, 2): "in the bottom right corner"}[(row, col)]


def _unique(scene: Scene, o: SceneObject) -> bool:
    """True when ``o`` is the only object of its colour and shape (``the red circle``)."""
    return sum(1 for p in scene.objects if (p.color, p.shape) == (o.color, o.shape)) == 1


def _grouped(objs: list[SceneObject], by_color: bool = True) -> list[str]:
    """Group identical descriptions: ``two red circles``, ``a blue square``."""
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        key = (o.color if by_color else "", o.shape)
        counts[key] = counts.get(key, 0) + 1
    return [_count_np(n, s, PLURALS[s], c) for (c, s), n in counts.items()]


def make_captions(scene: Scene, rng: np.random.Generator, k: int = CAPTIONS_PER_IMAGE
                  ) -> list[str]:
    """``k`` distinct captions, each true of the scene (see docs/SYNTHETIC.md for the grammar)."""
    objs = scene.objects
    n = len(objs)
    short = min(scene.width, scene.height)
    by_size = sorted(objs, key=lambda o: -o.full_area)
    pairs = [(a, b, relation(a, b, short)) for a in objs for b in objs if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None and _unique(scene, a)
             and _unique(scene, b)]
    occl = [(a, objs[j]) for a in objs for j in a.occluded_by]
    thing = ["shape", "object"][int(rng.integers(2))]

    def t_list():
        items = [_np(o, size=bool(rng.integers(2))) for o in objs]
        tail = ["", f" on a {scene.background} background"][int(rng.integers(2))]
        return _join(items) + tail

    def t_count():
        if n == 1:
            return [f"a single {_np(objs[0], article=False)}",
                    f"one {objs[0].color} {thing} in the picture"][int(rng.integers(2))]
        opts = [f"{NUMBER_WORDS[n]} {thing}s: {_join(_grouped(objs))}",
                f"there are {NUMBER_WORDS[n]} {thing}s in the image",
                f"{NUMBER_WORDS[n]} colorful {thing}s on a {scene.background} background"]
        return opts[int(rng.integers(len(opts)))]

    def t_shapes():
        return _join(_grouped(objs, by_color=False)) + ["", " of different colors"][
            int(n > 1 and len({o.color for o in objs}) == n)]

    def t_relation():
        if not pairs:
            return None
        a, b, r = pairs[int(rng.integers(len(pairs)))]
        return f"{_np(a, size=bool(rng.integers(2)))} {r} {_np(b)}"

    def t_occlusion():
        if not occl:
            return None
        back, front = occl[int(rng.integers(len(occl)))]
        # Name the two apart: with the size word when colour and shape are not enough.
        same = (back.color, back.shape) == (front.color, front.shape)
        if same and back.size == front.size:
            return None
        b, f = _np(back, size=same), _np(front, size=same)
        if bool(rng.integers(2)):
            return f"{b} partly hidden behind {f}"
        return f"{f} in front of {b}"

    def t_largest():
        big = by_size[0]
        word = ["large", "big"][int(rng.integers(2))]
        if n == 1:
            return f"a picture of {_np(big, size=True, size_word=word)}"
        if n > 1 and big.full_area < 1.3 * by_size[1].full_area:
            return None                     # no clear largest object
        others = n - 1
        rest = "another shape" if others == 1 else f"{NUMBER_WORDS[others]} other shapes"
        phrase = f"{word} {big.color} {big.shape}"
        return f"{_article(phrase)} {phrase} with {rest}"

    def t_location():
        o = objs[int(rng.integers(n))]
        if n > 1 and not _unique(scene, o):
            return None
        return f"{_np(o)} {_location(o, scene.width, scene.height)}"

    templates = [t_list, t_count, t_shapes, t_relation, t_occlusion, t_largest, t_location]
    out: list[str] = []
    for _ in range(60):
        t = templates[int(rng.integers(len(templates)))]
        c = t()
        if c is not None and c not in out:
            out.append(c)
            if len(out) == k:
                break
    listed = _join([_np(o) for o in objs])
    frames = [f"an image of {listed}", f"a picture showing {listed}", f"{listed} in a picture",
              f"a simple drawing of {listed}", f"{listed} drawn on a {scene.background} canvas"]
    for c in frames:                         # tiny scenes: vary the wording of the list
        if len(out) == k:
            break
        if c not in out:
            out.append(c)
    return out


def _variant(answer: str, kind: str, rng: np.random.Generator) -> str:
    """A correct answer as a person might type it (the official normaliser maps it back)."""
    u = rng.random()
    if kind == "number" and u < 0.25:
        return NUMBER_WORDS[int(answer)]
    if u < 0.1:
        return answer.capitalize()
    if kind == "shape" and u < 0.2:
        return f"{_article(answer)} {answer}"
    return answer


def _wrong(answer: str, kind: str, rng: np.random.Generator) -> str:
    if kind == "number":
        v = int(answer) + (1 if answer == "0" or rng.random() < 0.5 else -1)
        return str(v)
    if kind == "yes/no":
        return "no" if answer == "yes" else "yes"
    pool = [c for c in (COLORS if kind == "color" else SHAPES) if c != answer]
    return pool[int(rng.integers(len(pool)))]


def human_answers(answer: str, kind: str, rng: np.random.Generator,
                  k: int = ANSWERS_PER_QUESTION) -> list[str]:
    """``k`` answers to a question whose true answer is ``answer``: mostly right (sometimes
    typed differently), up to 4 wrong, so the true answer always has the most votes."""
    n_wrong = int(rng.choice(5, p=[0.35, 0.3, 0.2, 0.1, 0.05]))
    wrong_at = set(rng.choice(k, size=n_wrong, replace=False).tolist())
    return [_wrong(answer, kind, rng) if i in wrong_at else _variant(answer, kind, rng)
            for i in range(k)]


def make_questions(scene: Scene, rng: np.random.Generator, k: int = QUESTIONS_PER_IMAGE
                   ) -> list[dict]:
    """Up to ``k`` distinct questions with their true answer.

    Returns:
        Dicts with ``question``, ``answer``, ``kind`` (number, color, shape, yes/no),
        ``answer_type`` (VQA's number / other / yes/no) and ``question_type``.
    """
    objs = scene.objects
    short = min(scene.width, scene.height)
    colors_present = sorted({o.color for o in objs})
    shapes_present = sorted({o.shape for o in objs})
    thing = ["shapes", "objects"][int(rng.integers(2))]

    def q(question, answer, kind, qtype):
        atype = {"number": "number", "yes/no": "yes/no"}.get(kind, "other")
        return {"question": question, "answer": answer, "kind": kind, "answer_type": atype,
                "question_type": qtype}

    def q_count_all():
        return q(f"how many {thing} are there?", str(len(objs)), "number", "how many")

    def q_count_color():
        c = (colors_present[int(rng.integers(len(colors_present)))] if rng.random() < 0.75
             else list(COLORS)[int(rng.integers(len(COLORS)))])
        return q(f"how many {c} {thing} are there?", str(sum(o.color == c for o in objs)),
                 "number", "how many")

    def q_count_shape():
        s = (shapes_present[int(rng.integers(len(shapes_present)))] if rng.random() < 0.75
             else SHAPES[int(rng.integers(len(SHAPES)))])
        return q(f"how many {PLURALS[s]} are in the picture?",
                 str(sum(o.shape == s for o in objs)), "number", "how many")

    def q_color():
        uniq = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return q(f"what color is the {o.shape}?", o.color, "color", "what color is the")

    def q_shape():
        uniq = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return q(f"what shape is the {o.color} object?", o.shape, "shape", "what shape is the")

    def q_exists():
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            c, s = o.color, o.shape
        else:
            c = list(COLORS)[int(rng.integers(len(COLORS)))]
            s = SHAPES[int(rng.integers(len(SHAPES)))]
        present = any((o.color, o.shape) == (c, s) for o in objs)
        return q(f"is there {_article(c)} {c} {s}?", "yes" if present else "no", "yes/no",
                 "is there a")

    def _pairs():
        return [(a, b, r) for a in objs for b in objs if a is not b
                and (r := relation(a, b, short)) is not None
                and _unique(scene, a) and _unique(scene, b)]

    def q_relation_yn():
        pairs = _pairs()
        if not pairs:
            return None
        a, b, r = pairs[int(rng.integers(len(pairs)))]
        truth = rng.random() < 0.5
        asked = r if truth else OPPOSITE[r]
        return q(f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?",
                 "yes" if truth else "no", "yes/no", "is the")

    def q_relation_what():
        cands = []
        for b in objs:
            if not _unique(scene, b):
                continue
            for r in OPPOSITE:
                rel = [a for a in objs if a is not b and relation(a, b, short) == r]
                unclear = [a for a in objs if a is not b and relation(a, b, short) is None]
                if len(rel) == 1 and not unclear:
                    cands.append((rel[0], b, r))
        if not cands:
            return None
        a, b, r = cands[int(rng.integers(len(cands)))]
        return q(f"what shape is {r} the {b.color} {b.shape}?", a.shape, "shape",
                 "what shape is")

    makers = [q_count_all, q_count_color, q_count_shape, q_color, q_shape, q_exists,
              q_relation_yn, q_relation_what]
    out: list[dict] = []
    for _ in range(40):
        item = makers[int(rng.integers(len(makers)))]()
        if item is not None and item["question"] not in {x["question"] for x in out}:
            out.append(item)
            if len(out) == k:
                break
    return out
