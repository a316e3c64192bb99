"""The synthetic world: deterministic, boxes that match the pixels, annotations true of the
scene, and files the project's readers load."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkd.data.captions import captions_by_image, load_captions
from vlkd.data.images import coco_source, karpathy_source
from vlkd.data.synthetic import COLORS, PLURALS, SHAPES, generate
from vlkd.data.vqa import load_vqa, normalize_answer, soft_scores

NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = generate(out, num_train=40, num_val=12, num_test=8, seed=7)
    return out, paths


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    root, _ = world
    generate(tmp_path / "again", num_train=40, num_val=12, num_test=8, seed=7)
    generate(tmp_path / "other", num_train=40, num_val=12, num_test=8, seed=8)
    a, b, c = _files(root), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k] == b[k] for k in a)
    images = [k for k in a if k.endswith(".png")]
    assert len(images) == 60
    assert sum(a[k] != c[k] for k in images) == 60
    assert a["annotations/captions_train.json"] != c["annotations/captions_train.json"]


def test_val_and_test_do_not_depend_on_train_size(world, tmp_path):
    root, _ = world
    generate(tmp_path / "w", num_train=3, num_val=12, num_test=8, seed=7)
    a, b = _files(root), _files(tmp_path / "w")
    for k in b:
        if "/val" in k or "_val" in k or "/test" in k or "_test" in k:
            assert a[k] == b[k], k


def test_layout_ids_and_sizes(world):
    root, paths = world
    for split, n, base in (("train", 40, 1_000_000), ("val", 12, 2_000_000),
                           ("test", 8, 3_000_000)):
        inst = _load(paths[f"instances_{split}"])
        ids = [im["id"] for im in inst["images"]]
        assert ids == list(range(base, base + n))
        for im in inst["images"]:
            assert isinstance(im["id"], int)
            assert im["file_name"] == f"{im['id']}.png"
            with Image.open(root / "images" / split / im["file_name"]) as pic:
                assert pic.size == (im["width"], im["height"])
                assert pic.mode == "RGB"
            assert 64 <= im["width"] <= 256 and 64 <= im["height"] <= 256
        per_image = Counter(a["image_id"] for a in inst["annotations"])
        assert set(per_image) == set(ids)                      # every image has objects
        assert max(per_image.values()) <= 5
        assert [c["name"] for c in sorted(inst["categories"], key=lambda c: c["id"])] \
            == list(SHAPES)
    info = _load(paths["info"])
    assert info["counts"] == {"train": 40, "val": 12, "test": 8}


def test_boxes_and_areas_match_the_pixels(world):
    """Each object is filled with one exact colour: the pixels of that colour are its visible
    part, so their bounding box and count must be the annotation's bbox and area."""
    root, paths = world
    checked = 0
    for split in ("train", "val"):
        scenes = {s["image_id"]: s for s in _load(paths[f"scenes_{split}"])}
        inst = _load(paths[f"instances_{split}"])
        anns_by_image: dict[int, list] = {}
        for a in inst["annotations"]:
            anns_by_image.setdefault(a["image_id"], []).append(a)
        for im in inst["images"]:
            pix = np.asarray(Image.open(root / "images" / split / im["file_name"]))
            objs = scenes[im["id"]]["objects"]
            anns = anns_by_image[im["id"]]
            assert len(objs) == len(anns)
            rgbs = Counter(tuple(o["rgb"]) for o in objs)
            for o, a in zip(objs, anns):
                assert a["category_id"] == SHAPES.index(o["shape"]) + 1
                if rgbs[tuple(o["rgb"])] > 1:
                    continue
                mask = (pix == np.array(o["rgb"], dtype=np.uint8)).all(axis=2)
                ys, xs = np.nonzero(mask)
                box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert a["bbox"] == [float(v) for v in box]
                assert a["area"] == float(mask.sum())
                assert a["iscrowd"] == 0
                checked += 1
    assert checked > 100


def test_category_matches_the_drawn_shape(world):
    """Fill ratio (pixels / box area) of unoccluded objects tells the shapes apart: a
    check of the labels that does not use the generator's geometry."""
    root, paths = world
    ratios: dict[str, list[float]] = {s: [] for s in SHAPES}
    for split in ("train", "val", "test"):
        inst = _load(paths[f"instances_{split}"])
        names = {c["id"]: c["name"] for c in inst["categories"]}
        scenes = {s["image_id"]: s for s in _load(paths[f"scenes_{split}"])}
        k = Counter()
        for a in inst["annotations"]:
            o = scenes[a["image_id"]]["objects"][k[a["image_id"]]]
            k[a["image_id"]] += 1
            if o["occluded_by"]:
                continue
            ratios[names[a["category_id"]]].append(a["area"] / (a["bbox"][2] * a["bbox"][3]))
    assert all(len(v) >= 5 for v in ratios.values()), {k: len(v) for k, v in ratios.items()}
    assert min(ratios["circle"]) > 0.70 and max(ratios["circle"]) < 0.85   # pi/4
    assert max(ratios["star"]) < 0.46
    for s in ("triangle", "diamond", "cross"):
        assert 0.42 < np.mean(ratios[s]) < 0.62, s
    assert np.mean(ratios["square"]) > 0.7


def _objects(paths, split):
    """{image id (str): [(color, shape, center)]} from the scene files."""
    return {str(s["image_id"]): [(o["color"], o["shape"], o["center"]) for o in s["objects"]]
            for s in _load(paths[f"scenes_{split}"])}


def _rel_holds(rel, a, b):
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"to the left of": dx < 0 and abs(dx) > abs(dy),
            "to the right of": dx > 0 and abs(dx) > abs(dy),
            "above": dy < 0 and abs(dy) > abs(dx),
            "below": dy > 0 and abs(dy) > abs(dx)}[rel]


COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
PLURAL_RE = "|".join(PLURALS.values())
REL_RE = "to the left of|to the right of|above|below"


def test_captions_are_true_of_the_scene(world):
    _, paths = world
    for split in ("train", "val", "test"):
        objs = _objects(paths, split)
        refs = captions_by_image(load_captions(paths[f"captions_{split}"]))
        assert refs.keys() == objs.keys()
        for iid, caps in refs.items():
            scene = objs[iid]
            assert len(caps) == 5 and len(set(caps)) == 5
            have = Counter((c, s) for c, s, _ in scene)
            for cap in caps:
                # every "colour shape" phrase names an object of the scene
                for c, s in re.findall(rf"\b({COLOR_RE}) ({SHAPE_RE})\b", cap):
                    assert have[(c, s)] >= 1, (cap, scene)
                # "two red circles": exact counts
                for num, c, p in re.findall(rf"\b(two|three|four|five) ({COLOR_RE}) "
                                            rf"({PLURAL_RE})\b", cap):
                    s = next(k for k, v in PLURALS.items() if v == p)
                    assert have[(c, s)] == NUM[num], (cap, scene)
                # "three shapes" / "there are three objects"
                for num in re.findall(r"\b(two|three|four|five) (?:colorful )?(?:shapes|objects)"
                                      r"(?! of)\b", cap):
                    if "other" not in cap:
                        assert len(scene) == NUM[num], (cap, scene)
                m = re.search(r"with (another shape|(two|three|four) other shapes)", cap)
                if m:
                    assert len(scene) - 1 == (1 if m.group(2) is None else NUM[m.group(2)])
                # spatial relations between two uniquely named objects
                m = re.fullmatch(rf"an? (?:small |large )?({COLOR_RE}) ({SHAPE_RE}) ({REL_RE}) "
                                 rf"an? ({COLOR_RE}) ({SHAPE_RE})", cap)
                if m:
                    a = next(o[2] for o in scene if o[:2] == (m.group(1), m.group(2)))
                    b = next(o[2] for o in scene if o[:2] == (m.group(4), m.group(5)))
                    assert _rel_holds(m.group(3), a, b), (cap, scene)


def test_vqa_answers_are_true_of_the_scene(world):
    """The majority (normalised) human answer is the true one, computed here from the scene."""
    _, paths = world
    kinds = Counter()
    noisy = 0
    for split in ("train", "val", "test"):
        objs = _objects(paths, split)
        qs = load_vqa(paths[f"vqa_questions_{split}"], paths[f"vqa_annotations_{split}"])
        per_image = Counter(q.image_id for q in qs)
        assert set(per_image) == set(objs) and max(per_image.values()) == 10
        for q in qs:
            scene = objs[q.image_id]
            assert len(q.answers) == 10
            votes = Counter(normalize_answer(a) for a in q.answers)
            top = votes.most_common(1)[0][0]
            noisy += len(votes) > 1
            text = q.question
            if m := re.fullmatch(r"how many (shapes|objects) are there\?", text):
                truth = str(len(scene))
            elif m := re.fullmatch(rf"how many ({COLOR_RE}) (?:shapes|objects) are there\?", text):
                truth = str(sum(c == m.group(1) for c, _, _ in scene))
            elif m := re.fullmatch(rf"how many ({PLURAL_RE}) are in the picture\?", text):
                shape = next(k for k, v in PLURALS.items() if v == m.group(1))
                truth = str(sum(s == shape for _, s, _ in scene))
            elif m := re.fullmatch(rf"what color is the ({SHAPE_RE})\?", text):
                (truth,) = [c for c, s, _ in scene if s == m.group(1)]
            elif m := re.fullmatch(rf"what shape is the ({COLOR_RE}) object\?", text):
                (truth,) = [s for c, s, _ in scene if c == m.group(1)]
            elif m := re.fullmatch(rf"is there an? ({COLOR_RE}) ({SHAPE_RE})\?", text):
                truth = "yes" if (m.group(1), m.group(2)) in [o[:2] for o in scene] else "no"
            elif m := re.fullmatch(rf"is there an? ({COLOR_RE}) (?:shape|object)\?", text):
                truth = "yes" if m.group(1) in [o[0] for o in scene] else "no"
            elif m := re.fullmatch(rf"is there an? ({SHAPE_RE})\?", text):
                truth = "yes" if m.group(1) in [o[1] for o in scene] else "no"
            elif m := re.fullmatch(rf"is the ({COLOR_RE}) ({SHAPE_RE}) ({REL_RE}) the "
                                   rf"({COLOR_RE}) ({SHAPE_RE})\?", text):
                (a,) = [o[2] for o in scene if o[:2] == (m.group(1), m.group(2))]
                (b,) = [o[2] for o in scene if o[:2] == (m.group(4), m.group(5))]
                truth = "yes" if _rel_holds(m.group(3), a, b) else "no"
            elif m := re.fullmatch(rf"what shape is ({REL_RE}) the ({COLOR_RE}) ({SHAPE_RE})\?",
                                   text):
                (b,) = [o[2] for o in scene if o[:2] == (m.group(2), m.group(3))]
                truth = top
                assert any(s == top and _rel_holds(m.group(1), ctr, b) for _, s, ctr in scene)
            else:
                raise AssertionError(f"question outside the grammar: {text!r}")
            assert top == truth, (text, q.answers, scene)
            assert soft_scores(q.answers, scheme="linear", preprocess=True)[truth] == 1.0
            kinds[q.answer_type] += 1
    assert set(kinds) == {"number", "yes/no", "other"}
    assert noisy > 20          # some questions have disagreeing humans: soft scores matter


def _questions(split: str, n: int, seed: int = 3):
    from vlkd.data.synthetic import make_scene
    from vlkd.data.vqa import VQAQuestion

    out = []
    for i in range(n):
        _, scene = make_scene(seed, split, i)
        out += [(scene, VQAQuestion(scene.image_id * 10 + k, str(scene.image_id), qd["question"],
                                    qd["answers"], qd["answer_type"], qd["question_type"],
                                    qd["answer"]))
                for k, qd in enumerate(scene.questions)]
    return out


def test_vqa_answers_are_balanced_and_need_the_image():
    """Within each question type the answers are (nearly) uniform over the type's answer
    space, so neither the type nor the words of a question tell the answer: answering by type
    or by the question's text scores what chance and the human noise give, far below what
    reading the image gives (100)."""
    from vlkd.data.synthetic import ANSWER_SPACE, QUESTION_TYPES
    from vlkd.data.vqa import question_type_prior, vqa_accuracy

    train = _questions("train", 400)
    test = [q for _, q in _questions("test", 100)]
    by_type: dict[str, Counter] = {}
    for _, q in train:
        by_type.setdefault(q.question_type, Counter())[q.multiple_choice_answer] += 1
    assert set(by_type) == set(QUESTION_TYPES)
    for qtype, counts in by_type.items():
        space = ANSWER_SPACE.get(qtype, ("1", "2", "3", "4", "5"))
        assert set(counts) <= set(space), (qtype, counts)
        n = sum(counts.values())
        assert n >= 40, (qtype, n)
        # the most frequent answer is within a few standard errors of uniform
        p = 1 / len(space)
        assert max(counts.values()) / n <= p + 3 * (p * (1 - p) / n) ** 0.5 + 0.03, (qtype,
                                                                                     counts)
    # "is there a ...?" answered no: the colour and the shape are both in the image (on other
    # objects) whenever the image has two objects that differ in both
    hard = [(sc, q) for sc, q in train if q.question_type == "is there a [color] [shape]"
            and q.multiple_choice_answer == "no"]
    for sc, q in hard:
        c, s = q.question.rstrip("?").split()[-2:]
        if any(a.color != b.color and a.shape != b.shape for a in sc.objects
               for b in sc.objects):
            assert c in {o.color for o in sc.objects} and s in {o.shape for o in sc.objects}, \
                (q.question, sc.objects)
    trained = [q for _, q in train]
    prior = vqa_accuracy(question_type_prior(trained, test), test)["accuracy"]
    text = vqa_accuracy(question_type_prior(trained, test, by="question"), test)["accuracy"]
    assert prior < 52 and text < prior + 3, (prior, text)
    # no image asks a question twice, nor more than two of one type
    assert max(Counter((q.image_id, q.question) for _, q in train).values()) == 1
    assert max(Counter((q.image_id, q.question_type) for _, q in train).values()) == 2


def test_readers_and_image_sources_agree_on_ids(world):
    root, paths = world
    karpathy = load_captions(paths["karpathy"], split="val")
    coco = load_captions(paths["captions_val"])
    assert [(c.image_id, c.text) for c in karpathy] == [(c.image_id, c.text) for c in coco]
    assert len(load_captions(paths["karpathy"], split="train")) == 40 * 5
    src = coco_source(paths["instances_val"], paths["images_val"])
    assert [r.image_id for r in src] == [str(2_000_000 + i) for i in range(12)]
    for r in src:
        assert Path(r.path).stem == r.image_id and Path(r.path).is_file()
    ksrc = karpathy_source(paths["karpathy"], root)
    assert {r.image_id: r.path for r in ksrc} == {
        r.image_id: r.path for split in ("train", "val", "test")
        for r in coco_source(paths[f"instances_{split}"], paths[f"images_{split}"])}
    q = load_vqa(paths["vqa_questions_test"], paths["vqa_annotations_test"])
    assert {x.image_id for x in q} == {r.image_id for r in
                                       coco_source(paths["instances_test"], paths["images_test"])}


def test_module_entry_point_and_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlkd.data.synthetic", "--out", str(tmp_path / "w"),
                        "--num-train", "2", "--num-val", "1", "--num-test", "0", "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert Path(printed["instances_train"]).is_file() and "instances_test" not in printed
    assert sorted(p.name for p in (tmp_path / "w/images/train").iterdir()) == \
        ["1000000.png", "1000001.png"]
    r = subprocess.run([sys.executable, "-m", "vlkd.data.synthetic", "--out", str(tmp_path / "x"),
                        "--num-train", "1", "--min-size", "300", "--max-size", "200"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "min_size=300" in r.stderr
    with pytest.raises(ValueError, match="every split has 0 images"):
        generate(tmp_path / "y", num_train=0, num_val=0, num_test=0)


# sha256 over a seed-5 world (3 train, 2 val, 2 test images): every JSON file's bytes and every
# image's decoded RGB pixels, in sorted path order. A change here changes the world (and every
# number measured on it, docs/DEMO.md), so make it on purpose or not at all. Last changed with
# the balanced VQA questions (issue M): only the VQA files and the scene files (which carry the
# questions) differ from the world before; images, instances and captions are byte-identical.
PINNED_WORLD = "7888b600fbaa0f0b07b95dc5b23147d6236d3bbc23c04dbe9a7251a01a1f8292"


def test_world_is_pinned(tmp_path):
    import hashlib

    root = tmp_path / "pinned"
    generate(root, num_train=3, num_val=2, num_test=2, seed=5)
    h = hashlib.sha256()
    for name, data in _files(root).items():
        h.update(name.encode() + b"\0")
        if name.endswith(".png"):
            pixels = np.asarray(Image.open(root / name).convert("RGB"))
            h.update(repr(pixels.shape).encode() + pixels.tobytes())
        else:
            h.update(data)
    assert h.hexdigest() == PINNED_WORLD


def test_package_exports_and_module_layout():
    """Every public name is importable from vlkd.data.synthetic; the renderer knows nothing of
    the text, the text nothing of the files."""
    import vlkd.data.synthetic as syn
    from vlkd.data.synthetic import grammar, scene, writers

    assert all(hasattr(syn, name) for name in syn.__all__)
    assert syn.render_scene is scene.render_scene and syn.make_captions is grammar.make_captions
    assert syn.generate is writers.generate and syn.image_id_for("test", 4) == 3_000_004
    assert not hasattr(scene, "make_captions") and not hasattr(scene, "generate")
    assert not hasattr(grammar, "generate") and not hasattr(grammar, "render_scene")


def test_cli_help_documents_every_option():
    from click.testing import CliRunner

    from vlkd.data.synthetic.cli import main

    r = CliRunner().invoke(main, ["--help"], prog_name="python -m vlkd.data.synthetic")
    assert r.exit_code == 0, r.output
    assert "Usage: python -m vlkd.data.synthetic" in r.output
    for flag, shown in [("--out", "[required]"), ("--num-train", "[default: 800]"),
                        ("--num-val", "[default: 200]"), ("--num-test", "[default: 200]"),
                        ("--seed", "[default: 0]"), ("--min-size", "[default: 64]"),
                        ("--max-size", "[default: 256]")]:
        entry = " ".join(r.output.split(f"  {flag} ", 1)[1].split("\n  -", 1)[0].split())
        assert shown in entry, (flag, entry)
