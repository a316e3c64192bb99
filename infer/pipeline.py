"""Images to captions or answers through a bundle: the detector and the VL model in one process.

Each image goes the way it goes through the two phases, without the region set in between:

1. decoded and resized with the detector's preprocessing (``vlkd.extract.decoding``, in
   ``num_workers`` DataLoader processes), an unusable file becoming a listed failure;
2. detected and pooled by the detector exactly as ``vlkd-extract proposals`` does
   (``vlkd.extract.proposals.run_window``: images batched only with images of the same padded
   size, within windows of the list, so an image's regions never depend on its neighbours;
   features rounded to the set's dtype);
3. captioned or answered by the VL model from those regions
   (:class:`vlkd.train.predictor.VLPredictor`), as ``vlkd-train evaluate`` does from a set.

So a bundle's captions of a folder equal ``vlkd-extract proposals`` then ``vlkd-train
evaluate`` on the same images with the same settings (``tests/test_infer.py`` checks it)::

    from vlkd import Pipeline

    pipe = Pipeline.from_pretrained("bundle/")          # device="auto", precision="auto"
    for r in pipe("photos/"):                           # folder, list, COCO JSON, or a list
        print(r.image_id, r.caption)
    answers = pipe.answer("photos/", [{"question_id": 1, "image_id": "cat",
                                       "question": "what colour is the cat?"}])
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from vlkd.common.digest import bytes_digest
from vlkd.common.regionset import ImageRegions, RegionSet
from vlkd.data.images import DEFAULT_MAX_PIXELS, ImageRecord
from vlkd.extract.decoding import DecodedItem, DecodeDataset, decode_batches
from vlkd.extract.detector import Detector
from vlkd.extract.job import Failure
from vlkd.extract.options import ProposalsConfig
from vlkd.extract.proposals import run_proposals, run_window
from vlkd.train.predictor import VLPredictor

from .bundle import Bundle
from .config import PipelineConfig
from .inputs import (InMemoryImage, InputError, Question, image_records, load_questions,
                     match_questions, parse_question)

__all__ = ["Pipeline", "CaptionResult", "AnswerResult", "resolve_device", "resolve_precision"]

_AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CaptionResult:
    """One image's caption (``caption`` None and ``error`` set when the image was unusable).

    Attributes:
        image_id: the image's id (the source's rule).
        caption: the caption, or None.
        tags: the object tags the model read, as text.
        error: why the image was skipped (``kind: detail``, e.g. ``corrupt: ...``), or None.
    """

    image_id: str
    caption: str | None
    tags: str = ""
    error: str | None = None


@dataclass
class AnswerResult:
    """One question's answer (``answer`` None and ``error`` set when its image was unusable).

    Attributes:
        question_id, image_id, question: the question.
        answer: the most probable answer, or None.
        top_k: the best answers with their probabilities, best first (``top_k`` asked for).
        tags: the object tags the question was asked with, as text.
        error: why the question was skipped, or None.
    """

    question_id: int
    image_id: str
    question: str
    answer: str | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    tags: str = ""
    error: str | None = None


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use "
                         "--device cpu (or auto)")
    return d


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 on CUDA, fp32 on the CPU; fp16/bf16 are refused on the CPU."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in _AMP:
        raise InputError(f"--precision {precision!r}: expected auto, fp32, fp16 or bf16")
    if precision != "fp32" and device.type != "cuda":
        raise InputError(f"--precision {precision} runs on CUDA only; on {device} use fp32 (or "
                         "auto)")
    return precision


class Pipeline:
    """A loaded bundle: its detector and VL model on one device.

    Build it with :meth:`from_pretrained`. Calling it captions images; :meth:`answer` answers
    questions about them; :meth:`regions` gives the regions themselves.

    Args:
        bundle: the opened bundle.
        detector: its detector, loaded.
        predictor: its VL model, loaded.
        pipeline: the bundle's settings (box selection, feature dtype, beam).
        batch_size: images per detector pass and samples per VL pass.
        num_workers: decoding processes.
        max_pixels: refuse larger images (decompression bombs).

    Attributes:
        timings: seconds spent so far in ``decode``, ``detector`` and ``vl`` (the README
            card's split of the latency).
    """

    def __init__(self, bundle: Bundle, detector: Detector, predictor: VLPredictor,
                 pipeline: PipelineConfig, *, batch_size: int = 8, num_workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.bundle, self.detector, self.predictor = bundle, detector, predictor
        self.config = pipeline
        self.batch_size, self.num_workers, self.max_pixels = batch_size, num_workers, max_pixels
        self.window = max(32, 8 * batch_size)
        self.timings = {"decode": 0.0, "detector": 0.0, "vl": 0.0}

    @classmethod
    def from_pretrained(cls, bundle: str | os.PathLike, *, device: str = "auto",
                        precision: str = "auto", batch_size: int = 8, num_workers: int = 0,
                        max_pixels: int = DEFAULT_MAX_PIXELS,
                        pipeline: PipelineConfig | None = None) -> "Pipeline":
        """Load a bundle written by ``vlkd-train export``.

        Args:
            bundle: the bundle folder.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            precision: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``.
            batch_size, num_workers, max_pixels: see the class.
            pipeline: settings instead of the bundle's ``pipeline.yaml``.

        Raises:
            BundleError: the folder is not a complete bundle, or its parts do not fit.
        """
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        cfg = pipeline or b.pipeline
        det = Detector.load(b.detector_config, b.detector_weights, device=str(dev),
                            precision=prec)
        vl = VLPredictor(b.model_dir, device=dev, amp=_AMP[prec], beam_size=cfg.beam_size,
                         max_len=cfg.max_len, batch_size=batch_size)
        b.check_parts(det, vl)
        return cls(b, det, vl, cfg, batch_size=batch_size, num_workers=num_workers,
                   max_pixels=max_pixels)

    @property
    def task(self) -> str:
        return self.predictor.task

    # ------------------------------------------------------------------------------ regions
    def _decoded(self, records: Sequence[ImageRecord | InMemoryImage]
                 ) -> Iterator[list[DecodedItem]]:
        """The records decoded and preprocessed, one window (list of items) at a time."""
        groups = [k // self.window for k in range(len(records))]
        if records and isinstance(records[0], InMemoryImage):
            pre = self.detector.preprocessing
            for a in range(0, len(records), self.window):
                t0 = time.perf_counter()
                items = []
                for k in range(a, min(a + self.window, len(records))):
                    im = records[k]
                    try:
                        x, err = pre(im.rgb), None
                    except Exception as e:  # noqa: BLE001 - e.g. a 1x50000 image
                        x, err = None, f"preprocess: {type(e).__name__}: {e}"
                    items.append(DecodedItem(k, groups[k], im.image_id, x, im.rgb.shape[:2],
                                             bytes_digest(im.rgb.tobytes()), err))
                self.timings["decode"] += time.perf_counter() - t0
                yield items
            return
        if any(isinstance(r, InMemoryImage) for r in records):
            raise InputError("mix of file paths and decoded images: pass one kind")
        ds = DecodeDataset(records, groups, self.detector.preprocessing, self.max_pixels)
        window: list[DecodedItem] = []
        it = decode_batches(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=self.detector.device.type == "cuda")
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.timings["decode"] += time.perf_counter() - t0
            if batch is None:
                break
            if window and batch[0].group != window[0].group:
                yield window
                window = []
            window.extend(batch)
        if window:
            yield window

    def _detect(self, items: list[DecodedItem]) -> list[ImageRegions | Failure]:
        """One window's regions (a :class:`Failure` for each unusable image). A batch the
        detector fails on is retried image by image, so one bad image never fails the rest."""
        c = self.config
        t0 = time.perf_counter()
        try:
            out = run_window(self.detector, items, c.selection, self.batch_size,
                             c.feature_dtype, c.box_selection)
        except Exception:  # noqa: BLE001 - find the image(s) that fail, keep the others
            out = []
            for it in items:
                try:
                    out.extend(run_window(self.detector, [it], c.selection, 1, c.feature_dtype,
                                          c.box_selection))
                except Exception as e:  # noqa: BLE001
                    out.append(Failure(it.image_id, f"detector: {type(e).__name__}: {e}"))
        self.timings["detector"] += time.perf_counter() - t0
        return out

    def regions(self, images: Any, image_root: str | os.PathLike | None = None
                ) -> Iterator[tuple[ImageRecord | InMemoryImage, ImageRegions | Failure]]:
        """Each image's regions (or why it was skipped), window by window, in record order.

        Args:
            images: a folder, list file, COCO/Karpathy JSON, or a list of paths / decoded
                images (:func:`vlkd.infer.inputs.image_records`).
            image_root: as ``vlkd-extract --image-root``.
        """
        records, _ = image_records(images, image_root)
        yield from self.regions_of_records(records)

    def regions_of_records(self, records: Sequence[ImageRecord | InMemoryImage]
                           ) -> Iterator[tuple[ImageRecord | InMemoryImage,
                                               ImageRegions | Failure]]:
        """:meth:`regions` of records already listed (an image source's, in its order)."""
        pos = 0
        for items in self._decoded(records):
            results = self._detect(items)
            for res in results:
                yield records[pos], res
                pos += 1

    def extract(self, images: str | os.PathLike, out: str | os.PathLike,
                image_root: str | os.PathLike | None = None) -> RegionSet:
        """Write the images' regions as a region set (``vlkd-extract proposals`` with the
        bundle's detector and settings, one shard), and return it opened."""
        c = self.config
        cfg = ProposalsConfig(images=str(images), image_root=None if image_root is None
                              else str(image_root), config=str(self.bundle.detector_config),
                              weights=str(self.bundle.detector_weights), out=str(out),
                              shard_index="all", batch_size=self.batch_size,
                              num_workers=self.num_workers, device=str(self.detector.device),
                              precision=self.detector.precision,
                              feature_dtype=c.feature_dtype, max_pixels=self.max_pixels,
                              selection=c.selection, box_selection=c.box_selection,
                              max_failures="100%", progress=False)
        t0 = time.perf_counter()
        run_proposals(cfg, detector=self.detector)
        self.timings["detector"] += time.perf_counter() - t0
        return RegionSet(out)

    @staticmethod
    def regions_from_set(regions: RegionSet, records: Sequence[ImageRecord], window: int = 64
                         ) -> Iterator[tuple[ImageRecord, ImageRegions | Failure]]:
        """The records' regions read back from a set (its listed failures as failures)."""
        failed = {f["image_id"]: f["reason"] for f in regions.manifest.get("failures", [])}
        for a in range(0, len(records), window):
            part = records[a:a + window]
            ok = [r.image_id for r in part if r.image_id not in failed]
            got = dict(zip(ok, regions.get_many(ok)))
            for r in part:
                yield r, (Failure(r.image_id, failed[r.image_id]) if r.image_id in failed
                          else got[r.image_id])

    # ------------------------------------------------------------------------------ captions
    def __call__(self, images: Any, image_root: str | os.PathLike | None = None
                 ) -> list[CaptionResult]:
        """Caption images; one result per image, in the order of the records (a source's are
        sorted by id, a list keeps its order). Unusable images come back with ``error`` set."""
        return self.captions(self.regions(images, image_root))

    def captions(self, regions: Iterator[tuple[Any, ImageRegions | Failure]]
                 ) -> list[CaptionResult]:
        """Captions of ``(record, regions)`` pairs (:meth:`regions`), window by window."""
        out: list[CaptionResult] = []
        for chunk in _chunks(regions, self.window):
            ok = [r for _, r in chunk if not isinstance(r, Failure)]
            t0 = time.perf_counter()
            texts = iter(self.predictor.captions(ok))
            self.timings["vl"] += time.perf_counter() - t0
            for rec, r in chunk:
                if isinstance(r, Failure):
                    out.append(CaptionResult(rec.image_id, None, error=r.reason))
                else:
                    caption, tags = next(texts)
                    out.append(CaptionResult(rec.image_id, caption, tags))
        return out

    # ------------------------------------------------------------------------------ answers
    def answer(self, images: Any, questions: Any, image_root: str | os.PathLike | None = None,
               top_k: int = 1) -> list[AnswerResult]:
        """Answer questions about images; one result per question, by question id.

        Args:
            images: as for :meth:`regions`.
            questions: a questions file (VQA v2 JSON or JSON lines), or a list of
                :class:`~vlkd.infer.inputs.Question` or of dicts with ``question_id``,
                ``image_id``, ``question``.
            top_k: how many best answers each result lists.

        Raises:
            InputError: a question about an image the images do not include.
        """
        qs = as_questions(questions)
        records, _ = image_records(images, image_root)
        match_questions(qs, [r.image_id for r in records],
                        "the images" if not isinstance(images, (str, os.PathLike))
                        else str(images))
        asked = {q.image_id for q in qs}
        records = [r for r in records if r.image_id in asked]
        return self.answers(self.regions_of_records(records), qs, top_k)

    def answers(self, regions: Iterator[tuple[Any, ImageRegions | Failure]],
                questions: Sequence[Question], top_k: int = 1) -> list[AnswerResult]:
        """Answers of the questions about the images of ``(record, regions)`` pairs."""
        by_image: dict[str, list[Question]] = {}
        for q in questions:
            by_image.setdefault(q.image_id, []).append(q)
        names = self.predictor.answers
        out: list[AnswerResult] = []
        for chunk in _chunks(regions, self.window):
            asked, regs = [], []
            for rec, r in chunk:
                for q in by_image.get(rec.image_id, ()):
                    if isinstance(r, Failure):
                        out.append(AnswerResult(q.question_id, q.image_id, q.question, None,
                                                error=r.reason))
                    else:
                        asked.append(q)
                        regs.append(r)
            t0 = time.perf_counter()
            probs, tags = self.predictor.answer_scores(regs, [q.question for q in asked])
            self.timings["vl"] += time.perf_counter() - t0
            k = max(1, min(top_k, probs.shape[1]))
            # a stable sort: equal probabilities keep the lower index first, so the best one is
            # the argmax vlkd-train evaluate answers with
            order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]
            for j, q in enumerate(asked):
                best = [(names[i], float(probs[j, i])) for i in order[j].tolist()]
                out.append(AnswerResult(q.question_id, q.image_id, q.question, best[0][0],
                                        best, tags[j]))
        out.sort(key=lambda a: a.question_id)
        return out


def as_questions(questions: Any) -> list[Question]:
    """Questions from a file path or a list of :class:`Question` / dicts, by question id."""
    if isinstance(questions, (str, os.PathLike)):
        return load_questions(questions)
    qs = [q if isinstance(q, Question) else parse_question(q, f"question {k}")
          for k, q in enumerate(questions)]
    return sorted(qs, key=lambda q: q.question_id)


def _chunks(pairs, n: int):
    chunk = []
    for p in pairs:
        chunk.append(p)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

