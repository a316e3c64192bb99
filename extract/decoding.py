"""Reading, decoding and resizing images in DataLoader worker processes.

The throughput design: worker processes read, decode and resize images (CPU-bound, in
parallel); the main process only runs the network (``vlkd.extract.job`` hands the results to a
background writer thread), so that device time is never spent waiting on decoding or disk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlkd.common.preemption import ignore_stop_signals
from vlkd.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageRecord, read_image

from .memory import release_free_memory


@dataclass
class DecodedItem:
    """One image as a worker delivers it.

    Attributes:
        position: index of the image in the job's list (keeps results in order).
        group: the job's grouping key for this image (e.g. its commit window).
        image_id: the image's id.
        image: (3, h, w) uint8 network input (resized, model channel order), or None on
            failure.
        orig_hw: original (height, width) after EXIF orientation; (0, 0) on failure.
        digest: 16-byte digest of the file's bytes (zeros on failure).
        error: why the image cannot be used (``kind: detail``), or None.
    """

    position: int
    group: int
    image_id: str
    image: torch.Tensor | None
    orig_hw: tuple[int, int]
    digest: bytes
    error: str | None = None


class DecodeDataset(Dataset):
    """Reads, decodes and preprocesses images; a failure is returned, never raised, so one
    bad file does not stop the job.

    Args:
        records: the images, in job order.
        groups: one grouping key per record (passed through to :class:`DecodedItem`).
        preprocess: picklable callable (H, W, 3) uint8 RGB -> (3, h, w) uint8 tensor.
        max_pixels: decompression-bomb limit (see ``vlkd.data.images.read_image``).
    """

    def __init__(self, records: Sequence[ImageRecord], groups: Sequence[int],
                 preprocess: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.records = list(records)
        self.groups = list(groups)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self._served = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> DecodedItem:
        self._served += 1  # per process: each worker has its own copy
        if self._served % 32 == 0:
            release_free_memory()
        r = self.records[i]
        try:
            dec = read_image(r.path, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            return DecodedItem(i, self.groups[i], r.image_id, None, (0, 0), b"\0" * 16, str(e))
        try:
            image = self.preprocess(dec.rgb)
        except Exception as e:  # noqa: BLE001 - e.g. a 1x50000 image the resize cannot take
            return DecodedItem(i, self.groups[i], r.image_id, None, dec.hw, dec.digest,
                               f"preprocess: {type(e).__name__}: {e}")
        return DecodedItem(i, self.groups[i], r.image_id, image, dec.hw, dec.digest)


def _collate_list(items: list) -> list:
    return items


def _worker_init(_: int) -> None:
    # Decoding is PIL work; torch threads inside each worker would only oversubscribe cores.
    torch.set_num_threads(1)
    # A batch system signals every process of the job: the workers keep decoding until the
    # main process reaches its window boundary and shuts them down (common.preemption).
    ignore_stop_signals()


def decode_batches(dataset: DecodeDataset, *, batch_size: int, num_workers: int,
                   pin_memory: bool = False, prefetch_items: int = 0
                   ) -> Iterator[list[DecodedItem]]:
    """Decode ``dataset`` in order, ``batch_size`` items at a time, never mixing groups.

    Args:
        dataset: the images.
        batch_size: items per delivered list.
        num_workers: decoding processes (0: decode in this process).
        pin_memory: pin image tensors (faster host-to-GPU copies).
        prefetch_items: roughly how many items the workers may decode ahead of the consumer
            (at least two batches per worker).

    Yields:
        Lists of up to ``batch_size`` items of one group, in dataset order.
    """
    batches: list[list[int]] = []
    for i in range(len(dataset)):
        if batches and len(batches[-1]) < batch_size and \
                dataset.groups[batches[-1][0]] == dataset.groups[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    kwargs = {}
    if num_workers > 0:
        per_worker = math.ceil(prefetch_items / max(1, batch_size * num_workers))
        kwargs = dict(prefetch_factor=max(2, per_worker), worker_init_fn=_worker_init,
                      persistent_workers=False)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate_list, pin_memory=pin_memory, **kwargs)
    yield from loader


__all__ = ["DecodedItem", "DecodeDataset", "decode_batches"]
