"""`vlkd-extract inspect`: the summary of a set and boxes drawn with object tags."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from extract_fixtures import make_images
from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ShardWriter, file_digest
from vlkd.extract.cli import main
from vlkd.extract.inspect import LEGEND_ROW_H, PALETTE, TITLE_H, place_tags

# Regions per image of the proposals set written below (shard 0: 3 images, shard 1: 2 images
# and one failure).
COUNTS = {"img000": 3, "img001": 0, "img002": 5, "img003": 2, "img005": 4}
FAILED = {"img004": "corrupt: bad IDAT"}
STUDENT_NAMES = ["cat", "dog", "car"]
TEACHER_NAMES = ["sky", "tree", "road", "boat"]


def invoke(*argv, expect=0):
    res = CliRunner().invoke(main, [str(a) for a in argv])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == expect, res.output
    return res


def _boxes(iid: str, n: int, hw) -> np.ndarray:
    """n boxes spread over the image, left to right, so labels do not cover each other."""
    h, w = hw
    rs = np.random.RandomState(int(iid[3:]))
    x1 = np.linspace(4, w * 0.6, n) if n else np.zeros(0)
    y1 = rs.uniform(h * 0.3, h * 0.4, n)
    return np.stack([x1, y1, x1 + w * 0.3, y1 + h * 0.5], 1).astype(np.float32).reshape(n, 4)


def write_set(out: Path, role: str, images: dict, class_names, classes_of, *,
              aligned_to=None, dim=8, shift=0.0):
    """A 2-shard region set written with the format's writer (no detector needed)."""
    ids = sorted(list(COUNTS) + list(FAILED))
    shards = [ids[:3], ids[3:]]
    for k, shard_ids in enumerate(shards):
        with ShardWriter(out, k, 2, feature_dim=dim) as w:
            for iid in shard_ids:
                if iid in FAILED:
                    w.add_failure(iid, FAILED[iid])
                    continue
                hw = np.asarray(Image.open(images[iid])).shape[:2]
                n = COUNTS[iid]
                b = _boxes(iid, n, hw) + np.float32(shift)
                w.append(iid, hw, b, np.linspace(0.9, 0.5, n), classes_of(n),
                         np.ones((n, dim)), image_digest=file_digest(images[iid]))
            w.finalize()

    def header(m):
        m.update(role=role, class_names=class_names,
                 detector={"name": f"{role}-det", "kind": "C4"},
                 preprocessing={"min_size": 160, "max_size": 256, "input_format": "BGR"},
                 image_source={"kind": "folder", "path": str(Path(images["img000"]).parent),
                               "num_images": len(ids)})
        if aligned_to:
            m["aligned_to"] = {"path": str(aligned_to), "manifest_digest": "x", "role":
                               "proposals"}
    update_manifest(out, header)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    images = make_images(d / "imgs", 6, sizes=((120, 160), (96, 200)))
    props = write_set(d / "props", "proposals", images, STUDENT_NAMES,
                      lambda n: np.arange(n) % 3)
    teacher = write_set(d / "teacher", "teacher-features", images, TEACHER_NAMES,
                        lambda n: (np.arange(n) + 1) % 4, aligned_to=props)
    return {"dir": d, "images": images, "props": props, "teacher": teacher}


def test_summary(sets):
    res = invoke("inspect", sets["props"], "--json")
    s = json.loads(res.output)
    counts = list(COUNTS.values())
    assert s["role"] == "proposals" and s["num_shards"] == 2 and s["complete_shards"] == 2
    assert s["images"] == 5 and s["regions"] == sum(counts)
    assert s["regions_per_image"] == {"min": 0, "mean": pytest.approx(np.mean(counts)),
                                      "max": 5, "images_without_regions": 1}
    assert s["feature_dim"] == 8 and s["feature_dtype"] == "float16"
    assert s["failures"] == 1 and s["failure_examples"] == [
        {"image_id": "img004", "reason": FAILED["img004"]}]
    on_disk = sum(os.path.getsize(os.path.join(dp, f))
                  for dp, _, fs in os.walk(sets["props"]) for f in fs)
    assert s["bytes_on_disk"] == on_disk
    # classes are j % 3 per image: count them here
    per_class = np.bincount(np.concatenate([np.arange(n) % 3 for n in counts]), minlength=3)
    assert [(t["name"], t["regions"]) for t in s["top_classes"]] == sorted(
        [(STUDENT_NAMES[c], int(per_class[c])) for c in range(3)], key=lambda x: -x[1])

    text = invoke("inspect", sets["teacher"]).output
    assert "regions / image  min 0, mean 2.8, max 5 (1 image(s) with none)" in text
    assert "features         8 x float16" in text
    assert f"aligned to       {sets['props']}" in text
    assert "img004: corrupt: bad IDAT" in text
    assert re.search(r"^role +teacher-features$", text, re.M)


def _panels(png: Path, hw, n_panels):
    """The figure, a panel's width, the image's scale and the image's first row."""
    fig = np.asarray(Image.open(png).convert("RGB"))
    pw = fig.shape[1] // n_panels
    assert fig.shape[1] == pw * n_panels
    return fig, pw, pw / hw[1], TITLE_H


def _edge(fig, box, p, pw, scale, top, dx=1):
    """The pixel in the middle of ``box``'s left edge, in panel ``p``."""
    x1, y1, x2, y2 = box
    return tuple(fig[top + int((y1 + y2) / 2 * scale), p * pw + int(x1 * scale) + dx])


def test_draw_side_by_side(sets, tmp_path):
    png = tmp_path / "x.png"
    res = invoke("inspect", sets["teacher"], "--image-id", "img002", "--draw", png)
    assert "drew the best 5 of 5 box(es) of 'img002' with student tags (proposals-det) and " \
        "teacher tags (same boxes) (teacher-features-det)" in res.output
    src = np.asarray(Image.open(sets["images"]["img002"]).convert("RGB"))
    fig, pw, scale, top = _panels(png, src.shape[:2], 2)
    sh = int(round(src.shape[0] * scale))
    assert fig.shape[0] == top + sh + 5 * LEGEND_ROW_H + 4       # a legend line per box
    boxes = _boxes("img002", 5, src.shape[:2])
    for p in range(2):
        for j, box in enumerate(boxes):     # box j's colour in both panels
            assert _edge(fig, box, p, pw, scale, top) == PALETTE[j], (p, j)
    # The picture under the boxes is the image: a block's centre, away from every box.
    by, bx = 4, 4  # block (0, 0) centre in source pixels; boxes start at y >= 0.3 h
    got = fig[top + int(by * scale), int(bx * scale)].astype(int)
    assert np.abs(got - src[by, bx].astype(int)).max() <= 3
    # Same boxes, same numbered tags: the pictures are identical, only the legends differ.
    left, right = fig[:, :pw].astype(int), fig[:, pw:2 * pw].astype(int)
    assert (left[top:top + sh] == right[top:top + sh]).all()
    legend = np.abs(left - right).max(2)[top + sh:] > 0
    assert legend.any()
    # the legend's swatches are the boxes' colours, one line each, best first
    for j in range(5):
        y = top + sh + 2 + j * LEGEND_ROW_H + 7
        assert tuple(fig[y, 8]) == PALETTE[j] and tuple(fig[y, pw + 8]) == PALETTE[j]

    # One set: one panel, the best --max-boxes boxes.
    invoke("inspect", sets["props"], "--image-id", "img002", "--draw", tmp_path / "one.png",
           "--max-boxes", 2)
    fig1, pw1, scale1, top1 = _panels(tmp_path / "one.png", src.shape[:2], 1)
    assert fig1.shape[0] == top1 + sh + 2 * LEGEND_ROW_H + 4
    assert _edge(fig1, boxes[2], 0, pw1, scale1, top1) != PALETTE[2]
    assert _edge(fig1, boxes[1], 0, pw1, scale1, top1) == PALETTE[1]


def test_draw_the_teachers_own_boxes_beside_the_aligned_ones(sets, tmp_path):
    """--unaligned: a third panel with the teacher's own boxes (other boxes, other tags) over
    the student's boxes in grey."""
    own = write_set(tmp_path / "own", "proposals", sets["images"], TEACHER_NAMES,
                    lambda n: np.arange(n) % 4, shift=6.0)
    png = tmp_path / "three.png"
    res = invoke("inspect", sets["teacher"], "--image-id", "img002", "--draw", png,
                 "--unaligned", own, "--max-boxes", 3)
    assert "and own boxes of proposals-det (no VTA)" in res.output
    src = np.asarray(Image.open(sets["images"]["img002"]).convert("RGB"))
    fig, pw, scale, top = _panels(png, src.shape[:2], 3)
    boxes = _boxes("img002", 5, src.shape[:2])
    for j in range(3):
        assert _edge(fig, boxes[j] + 6.0, 2, pw, scale, top) == PALETTE[len(PALETTE) - 1 - j]
        assert _edge(fig, boxes[j], 2, pw, scale, top, dx=0) == (200, 200, 200)  # aligned box
        assert _edge(fig, boxes[j], 0, pw, scale, top) == PALETTE[j]
    res = invoke("inspect", sets["teacher"], "--image-id", "img004", "--draw", png,
                 "--unaligned", own, expect=1)
    assert "is not in" in res.output


def test_number_tags_never_cover_each_other():
    """Eight boxes on top of each other (a detector's duplicates): every tag finds its own
    place inside the picture, the first one above the top-left corner of its box."""
    boxes = np.array([[100, 100, 200, 180]] * 6 + [[0, 0, 30, 30], [410, 300, 480, 360]], float)
    sizes = [(14.0, 16.0)] * len(boxes)
    rects = place_tags(boxes, sizes, 480, 360)
    assert rects[0] == (100, 84, 114, 100)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 480 and 0 <= a[1] and a[3] <= 360, a
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_draw_errors(sets, tmp_path):
    res = invoke("inspect", sets["teacher"], "--image-id", "img004", "--draw",
                 tmp_path / "x.png", expect=1)
    assert "image 'img004' is not in" in res.output and "(it failed: corrupt" in res.output
    res = invoke("inspect", sets["props"], "--image-id", "img002", "--draw", tmp_path / "x.png",
                 "--images", tmp_path, expect=1)
    assert "lists no images" in res.output or "is not in the image source" in res.output
    res = invoke("inspect", sets["props"], "--image-id", "img002", expect=2)
    assert "--image-id and --draw go together" in res.output
    # Two sets whose boxes differ for the image cannot be compared box by box.
    other = write_set(tmp_path / "other", "proposals", sets["images"], STUDENT_NAMES,
                      lambda n: np.zeros(n, int))
    import h5py
    with h5py.File(other / "shard-00000-of-00002.h5", "r+") as f:
        f["box_digest"][2] = np.zeros(16, np.uint8)
    res = invoke("inspect", sets["teacher"], "--with", other, "--image-id", "img002", "--draw",
                 tmp_path / "x.png", expect=1)
    assert "different boxes for 'img002'" in res.output
