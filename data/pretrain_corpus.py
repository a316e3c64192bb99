"""Oscar / VinVL pre-training corpora: the corpus TSV and the QA answer file, read as Oscar's
``OscarTSVDataset`` reads them (microsoft/Oscar ``oscar/datasets/oscar_tsv.py``).

A corpus file (``coco_flickr30k_gqa.tsv`` and the like, VinVL_DOWNLOAD.md "Oscar+ pretraining
corpus") has one row per text, three tab-separated fields, each stripped::

    img_key      label_key                 text_a
    coco_391895  coco_391895               A man with a red helmet on a small moped.
    gqa_2354786  gqa_qa_2354786_02930152   Is the sky dark?
    cc_0_1234    cc_0_1234                 a photo of a dog on a beach

- the dataset is the first ``_`` field of both keys, which must agree (``cc`` means
  ``googlecc``); the image is the last field of ``img_key`` (the key Oscar looks its features
  up by), the chunk the one before it for the chunked datasets (googlecc, sbu, oi, objects365,
  tagoi);
- a ``label_key`` with a ``qa`` field is a QA row: its last field is the QA id, the one before
  it must be the image; text b is the space-joined ``labels`` of that id's row of the dataset's
  ``QA_fileB.tsv`` (``qa_id<TAB>{"labels": [...]}``): the answer;
- any other row is a caption row: the ``label_key``'s last field must be the image, and text b
  is the image's object tags (Oscar reads them from ``predictions_gt.tsv``; vlkd takes them
  from the region set, as for every other text).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .captions import AnnotationError

__all__ = ["OscarRow", "SPLIT_DATASETS", "read_oscar_corpus", "read_qa_labels",
           "is_oscar_corpus"]

#: Oscar's ``datasets_with_splits``: their image keys end in ``<chunk>_<image>``.
SPLIT_DATASETS = ("googlecc", "sbu", "oi", "objects365", "tagoi")


@dataclass(frozen=True)
class OscarRow:
    """One row of an Oscar pre-training corpus.

    Attributes:
        line: 1-based line number in the corpus file (the row's key).
        img_key, label_key: The row's first two fields.
        dataset: ``coco``, ``flickr30k``, ``gqa``, ``googlecc``, ...
        image: The image id (last field of ``img_key``).
        chunk: The feature chunk of a chunked dataset, else "".
        text_a: Caption or question.
        text_b: A QA row's answer (its ``QA_fileB.tsv`` labels, space-joined); "" for a caption
            row (whose text b is the image's tags).
        qa_id: A QA row's id, else "".
    """

    line: int
    img_key: str
    label_key: str
    dataset: str
    image: str
    chunk: str
    text_a: str
    text_b: str = ""
    qa_id: str = ""


def _dataset(name: str) -> str:
    return "googlecc" if name == "cc" else name


def is_oscar_corpus(path: str | Path) -> bool:
    """Whether a ``.tsv`` file's first row has Oscar's three fields (vlkd's pair TSV has two)."""
    path = Path(path)
    if path.suffix not in (".tsv", ".txt") or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return len(line.rstrip("\r\n").split("\t")) >= 3
    return False


def read_qa_labels(path: str | Path) -> dict[str, list[str]]:
    """``QA_fileB.tsv``: QA id → its answer labels."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"QA labels file {path} does not exist; give the QA rows' "
                              "dataset's QA_fileB.tsv")
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = [s.strip() for s in line.split("\t")]
            try:
                labels = json.loads(row[1])["labels"]
            except (IndexError, ValueError, KeyError, TypeError):
                raise AnnotationError(f"{path}:{ln}: expected 'qa_id<TAB>{{\"labels\": [...]}}' "
                                      f"(Oscar's QA_fileB.tsv), found {line[:80]!r}") from None
            out[row[0]] = [str(x) for x in labels]
    return out


def read_oscar_corpus(path: str | Path, *, datasets=(), qa_labels: str | Path | None = None
                      ) -> list[OscarRow]:
    """The rows of an Oscar pre-training corpus TSV (see the module docstring).

    Args:
        path: The corpus file.
        datasets: Keep the rows of these datasets only (``cc`` and ``googlecc`` are one);
            empty: every row.
        qa_labels: ``QA_fileB.tsv`` for the QA rows kept; required when there are any.

    Raises:
        AnnotationError: a row that Oscar's reader would refuse (keys of different datasets or
            images, an empty text), a QA row without ``qa_labels`` or whose id is not there.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"pre-training corpus {path} does not exist")
    keep = {_dataset(d) for d in datasets}
    answers = read_qa_labels(qa_labels) if qa_labels else None
    rows: list[OscarRow] = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = [s.strip() for s in line.split("\t")]
            where = f"{path}:{ln}"
            if len(row) < 3:
                raise AnnotationError(f"{where}: expected Oscar's 'img_key<TAB>label_key<TAB>"
                                      f"text' row, found {len(row)} field(s)")
            img, lab = row[0].split("_"), row[1].split("_")
            if img[0] != lab[0]:
                raise AnnotationError(f"{where}: image key {row[0]!r} and label key {row[1]!r} "
                                      "name different datasets")
            dataset = _dataset(lab[0])
            if keep and dataset not in keep:
                continue
            if len(img) < 2 or (dataset in SPLIT_DATASETS and len(img) < 3):
                raise AnnotationError(f"{where}: image key {row[0]!r} has no image id field"
                                      + (" and chunk field" if dataset in SPLIT_DATASETS else ""))
            if not row[2]:
                raise AnnotationError(f"{where}: text a is empty ({row[0]})")
            image = img[-1]
            chunk = img[-2] if dataset in SPLIT_DATASETS else ""
            text_b = qa_id = ""
            if "qa" in lab:
                if lab[-2] != image:
                    raise AnnotationError(f"{where}: QA key {row[1]!r} names image {lab[-2]!r}, "
                                          f"the row image {image!r}")
                qa_id = lab[-1]
                if answers is None:
                    raise AnnotationError(f"{where}: a QA row ({row[1]}) but no QA_fileB.tsv; "
                                          "give it as the corpus's qa_labels, or keep only "
                                          "caption datasets (oscar_datasets)")
                if qa_id not in answers:
                    raise AnnotationError(f"{where}: QA id {qa_id!r} is not in {qa_labels}")
                text_b = " ".join(answers[qa_id])
                if not text_b:
                    raise AnnotationError(f"{where}: QA id {qa_id!r} has no labels (text b)")
            elif lab[-1] != image:
                raise AnnotationError(f"{where}: label key {row[1]!r} names image {lab[-1]!r}, "
                                      f"the row image {image!r}")
            rows.append(OscarRow(ln, row[0], row[1], dataset, image, chunk, row[2], text_b,
                                 qa_id))
    return rows
