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
QUESTIONS_PER_IMAGE = 10
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


#: The question templates: ``question_type`` (what the VQA files record and the
#: question-type prior answers by) -> (VQA answer type, what the answer is). Every type's
#: answers are balanced by construction (:func:`make_questions`), so neither the type nor the
#: words of a question tell its answer.
QUESTION_TYPES = {
    "how many": ("number", "objects in the image, 1-5"),
    "how many [color]": ("number", "objects of one colour, 0-2"),
    "how many [shape]": ("number", "objects of one shape, 0-2"),
    "what color is the": ("other", "the colour of the only object of a shape"),
    "what shape is the": ("other", "the shape of the only object of a colour"),
    "is there a [color] [shape]": ("yes/no", "whether a colour-and-shape pair is in the image"),
    "is there a [color]": ("yes/no", "whether an object of a colour is in the image"),
    "is there a [shape]": ("yes/no", "whether an object of a shape is in the image"),
    "is the": ("yes/no", "whether a relation holds between two objects"),
    "what shape is [relation]": ("other", "the shape of the only object in a relation"),
}
#: The answers of each question type (a type not listed: the object count, 1-5).
ANSWER_SPACE = {
    "how many [color]": ("0", "1", "2"), "how many [shape]": ("0", "1", "2"),
    "what color is the": tuple(COLORS), "what shape is the": SHAPES,
    "is there a [color] [shape]": ("yes", "no"), "is there a [color]": ("yes", "no"),
    "is there a [shape]": ("yes", "no"), "is the": ("yes", "no"),
    "what shape is [relation]": SHAPES,
}
#: At most this many questions of one of the types that ask about one object (its colour, its
#: shape, a relation) per image.
PER_TYPE = 2


def make_questions(scene: Scene, rng: np.random.Generator, k: int = QUESTIONS_PER_IMAGE
                   ) -> list[dict]:
    """Up to ``k`` distinct questions with their true answer, each answerable only from the
    image's objects (colour, shape, count, position) and balanced within its question type
    (:data:`QUESTION_TYPES`, :data:`ANSWER_SPACE`).

    Every type gives questions about this image whose answers are balanced by construction:
    the colour of objects whose shape occurs once and the shape of objects whose colour occurs
    once (at most :data:`PER_TYPE` each; colours and shapes are drawn uniformly and
    independently, so these answers are uniform), each "is there ...?" once answered yes and
    once no, relations asked true or reversed at random, one count of each kind. ``k`` of them
    are kept, a uniform sample that does not look at the answers, so the balance stays.

    Returns:
        Dicts with ``question``, ``answer``, ``kind`` (number, color, shape, yes/no),
        ``answer_type`` (VQA's number / other / yes/no) and ``question_type``.
    """
    objs = scene.objects
    short = min(scene.width, scene.height)
    colors, present = list(COLORS), {(o.color, o.shape) for o in objs}
    thing = ["shapes", "objects"][int(rng.integers(2))]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def q(question, answer, kind, qtype):
        return {"question": question, "answer": answer, "kind": kind,
                "answer_type": QUESTION_TYPES[qtype][0], "question_type": qtype}

    def some(items: list, n: int = PER_TYPE) -> list:
        return [items[int(i)] for i in sorted(rng.permutation(len(items))[:n])]

    def count_all():
        return [q(f"how many {thing} are there?", str(len(objs)), "number", "how many")]

    def by_count(qtype, words, of):
        """A word (colour or shape) that ``n`` objects have, for ``n`` drawn from the type's
        answers; asked only of images where every answer occurs (a count of 2 is rarer than
        0 or 1, so drawing ``n`` alone would not balance them)."""
        counts = {w: sum(of(o) == w for o in objs) for w in words}
        space = ANSWER_SPACE[qtype]
        if not set(space) <= {str(n) for n in counts.values()}:
            return None
        n = pick(space)
        return n, pick([w for w in words if str(counts[w]) == n])

    def count_color():
        got = by_count("how many [color]", colors, lambda o: o.color)
        return [q(f"how many {got[1]} {thing} are there?", got[0], "number",
                  "how many [color]")] if got else []

    def count_shape():
        got = by_count("how many [shape]", SHAPES, lambda o: o.shape)
        return [q(f"how many {PLURALS[got[1]]} are in the picture?", got[0], "number",
                  "how many [shape]")] if got else []

    def colors_of_shapes():
        return some([q(f"what color is the {o.shape}?", o.color, "color", "what color is the")
                     for o in objs if sum(p.shape == o.shape for p in objs) == 1])

    def shapes_of_colors():
        return some([q(f"what shape is the {o.color} object?", o.shape, "shape",
                       "what shape is the")
                     for o in objs if sum(p.color == o.color for p in objs) == 1])

    colors_in, shapes_in = sorted({o.color for o in objs}), sorted({o.shape for o in objs})

    def exists_pair():
        qtype = "is there a [color] [shape]"
        c, s = pick(sorted(present))
        yes = q(f"is there {_article(c)} {c} {s}?", "yes", "yes/no", qtype)
        # Hard negatives: the colour and the shape are both in the image, on other objects,
        # so neither the tags alone nor the colours alone answer it.
        absent = [(c, s) for c in colors for s in SHAPES if (c, s) not in present]
        hard = [cs for cs in absent if cs[0] in colors_in and cs[1] in shapes_in]
        half = [cs for cs in absent if cs[0] in colors_in or cs[1] in shapes_in]
        c, s = pick(hard or half)
        return [yes, q(f"is there {_article(c)} {c} {s}?", "no", "yes/no", qtype)]

    def exists_color():
        qtype = "is there a [color]"
        yes, no = pick(colors_in), pick([c for c in colors if c not in colors_in])
        return [q(f"is there {_article(c)} {c} {thing[:-1]}?", a, "yes/no", qtype)
                for c, a in ((yes, "yes"), (no, "no"))]

    def exists_shape():
        qtype = "is there a [shape]"
        absent = [s for s in SHAPES if s not in shapes_in]
        if not absent:
            return []
        return [q(f"is there {_article(s)} {s}?", a, "yes/no", qtype)
                for s, a in ((pick(shapes_in), "yes"), (pick(absent), "no"))]

    def relations_yn():
        pairs = [(a, b, r) for i, a in enumerate(objs) for b in objs[i + 1:]
                 if (r := relation(a, b, short)) is not None
                 and _unique(scene, a) and _unique(scene, b)]
        out = []
        for a, b, r in some(pairs):
            truth = pick(ANSWER_SPACE["is the"]) == "yes"
            if pick((0, 1)):                 # either object first
                a, b, r = b, a, OPPOSITE[r]
            asked = r if truth else OPPOSITE[r]
            out.append(q(f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?",
                         "yes" if truth else "no", "yes/no", "is the"))
        return out

    def relations_what():
        cands = []
        for b in objs:
            if not _unique(scene, b) or any(relation(a, b, short) is None
                                            for a in objs if a is not b):
                continue
            for r in OPPOSITE:
                rel = [a for a in objs if a is not b and relation(a, b, short) == r]
                if len(rel) == 1:
                    cands.append((rel[0], b, r))
        return [q(f"what shape is {r} the {b.color} {b.shape}?", a.shape, "shape",
                  "what shape is [relation]") for a, b, r in some(cands)]

    every = [item for make in (count_all, count_color, count_shape, colors_of_shapes,
                               shapes_of_colors, exists_pair, exists_color, exists_shape,
                               relations_yn, relations_what)
             for item in make()]
    return [every[int(i)] for i in sorted(rng.permutation(len(every))[:k])]
