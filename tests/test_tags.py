"""Object tags: from the regions' own boxes (aligned), from any set over the same images by image
id (box-independent, as Oscar's VQA recipe takes tags from a COCO detector), filtered by a tag
vocabulary, and "attribute + object" tags from stored attributes."""
from __future__ import annotations

import numpy as np
import pytest

from train_data import SHAPES, scenes, write_sets
from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ShardWriter
from vlkd.train.stream import AlignmentError, Record, RegionStream, make_loader
from vlkd.train.tasks import TextEncoder
from vlkd.train.tokenizer import build_vocab

OTHER_CLASSES = ["person", "car", "dog", "kite", "tree"]
ATTRS = ["red", "wooden", "shiny"]


def _other_set(root, sc, *, attributes=False, drop=()):
    """Another detector's proposals over the same images: its own boxes and classes (image i
    gets classes (i + j) % 5 for j < 2 + i % 3), optionally with attributes."""
    out = root / "other"
    extras = {"attr_ids": ("int32", 2), "attr_scores": ("float32", 2)} if attributes else None
    want = {}
    with ShardWriter(out, 0, 1, feature_dim=4, extras=extras) as w:
        for i, im in enumerate(sc):
            if im["image_id"] in drop:
                continue
            n = 2 + i % 3
            classes = np.array([(i + j) % 5 for j in range(n)], np.int32)
            attrs = np.array([[(i + j) % 4 - 1, -1] for j in range(n)], np.int32)  # -1: none
            w.append(im["image_id"], im["hw"], np.tile([1, 1, 9, 9], (n, 1)), np.ones(n),
                     classes, np.zeros((n, 4)),
                     extras={"attr_ids": attrs, "attr_scores": (attrs >= 0).astype(np.float32)}
                     if attributes else None)
            want[im["image_id"]] = (classes, attrs[:, 0])
        w.finalize()
    update_manifest(out, lambda m: m.update(role="proposals", class_names=OTHER_CLASSES,
                                            **({"attribute_names": ATTRS} if attributes else {})))
    return out, want


def _capture(sample):
    classes, attrs = sample.tags(50)
    return {"id": sample.regions.image_id, "tags": classes, "attrs": attrs,
            "boxes": sample.regions.num_regions}


def _collect(items):
    return {"items": items}


def _samples(stream):
    return [it for b in make_loader(stream) for it in b["items"]]


def test_tags_by_image_id_from_another_set(tmp_path):
    sc = scenes(9, seed=4)
    student, _ = write_sets(tmp_path, sc, num_shards=2, teacher=False)
    other, want = _other_set(tmp_path, sc, drop={sc[3]["image_id"]})
    records = [Record(im["image_id"], im["image_id"]) for im in sc]
    s = RegionStream(student, records, transform=_capture, collate=_collect, batch_size=4,
                     shuffle=False, tag_regions=other, tag_source="image", rank=0, world_size=1)
    assert s.class_names == OTHER_CLASSES
    got = {it["id"]: it for it in _samples(s)}
    for im in sc:
        it = got[im["image_id"]]
        if im["image_id"] == sc[3]["image_id"]:
            assert it["tags"].tolist() == []  # not in the tag set: no tags (logged)
        else:
            # the other detector's own classes, not one per student box
            assert it["tags"].tolist() == want[im["image_id"]][0].tolist()
        assert it["attrs"] is None
    with pytest.raises(ValueError, match="tag_source 'image' takes the tags from another set"):
        RegionStream(student, records, transform=_capture, collate=_collect, batch_size=4,
                     tag_source="image", rank=0, world_size=1)


def test_attribute_tags_and_refusal(tmp_path):
    sc = scenes(6, seed=5)
    student, _ = write_sets(tmp_path, sc, num_shards=1, teacher=False)
    other, want = _other_set(tmp_path, sc, attributes=True)
    records = [Record(im["image_id"], im["image_id"]) for im in sc]
    s = RegionStream(student, records, transform=_capture, collate=_collect, batch_size=3,
                     shuffle=False, tag_regions=other, tag_source="image", tag_attributes=True,
                     rank=0, world_size=1)
    assert s.attribute_names == ATTRS
    for it in _samples(s):
        assert it["attrs"].tolist() == want[it["id"]][1].tolist()
    with pytest.raises(AlignmentError, match="attribute tags need a tag set with stored "
                                             "attributes.*no attr_ids"):
        RegionStream(student, records, transform=_capture, collate=_collect, batch_size=3,
                     tag_attributes=True, rank=0, world_size=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = d / "words.txt"
    text.write_text(" ".join(SHAPES + OTHER_CLASSES + ATTRS + ["a", "the"]) + "\n")
    return build_vocab([str(text)], str(d / "vocab"), vocab_size=200, min_frequency=1)


def test_encoder_vocab_filter_and_attribute_object_tags(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep = tokenizer.get_vocab()["[SEP]"]
    enc = TextEncoder(tokenizer, OTHER_CLASSES, max_tag_len=30, attribute_names=ATTRS,
                      tag_vocab=["car", "Kite", "boat"])
    classes = np.array([0, 1, 3, 1, 4])
    attrs = np.array([2, 0, -1, 1, 0])
    # person and tree are not in the vocabulary; car is red, kite has none, the 2nd car wooden
    assert enc.tag_ids(classes, attrs).tolist() == \
        ids("red car") + ids("kite") + ids("wooden car") + [sep]
    assert enc.tag_ids(classes).tolist() == ids("car kite car") + [sep]
    uniq = TextEncoder(tokenizer, OTHER_CLASSES, unique_tags=True, attribute_names=ATTRS)
    assert uniq.tag_ids(classes, attrs).tolist() == \
        ids("shiny person red car kite red tree") + [sep]
    with pytest.raises(ValueError, match="attribute id 7 is outside"):
        enc.tag_ids(np.array([1]), np.array([7]))
