"""The one batching rule of the image jobs: within a window, only images of the same padded size
share a batch.

detectron2's ``ImageList`` pads a batch to its largest image, and the padded border is not
zero after the first FrozenBN, so an image batched with a larger one gets other features than
alone. Batching only images that pad to the same size alone (``Detector.padded_hw``) keeps
every image's result independent of its neighbours.

The rule: within one window, the images of each padded size form batches of ``batch_size`` in
the order they arrive; the last, partial batch of each size runs when the window ends. The
batches depend only on the window's images and their order, so a resumed job (which re-forms
the same windows) forms the batches an uninterrupted one did. A batch runs as soon as it is
full, so decoding overlaps compute from the first images of a shard on.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Sequence, TypeVar

from .decoding import DecodedItem
from .memory import release_free_memory

R = TypeVar("R")


class WindowBatcher(Generic[R]):
    """Batches one window's images by padded size as they arrive (module docstring).

    Args:
        run: ``run(items, payloads) -> results``, one result per item, in order; called with
            the images of one padded size (and what each was added with).
        padded_hw: ``(h, w)`` of a network input -> the size it pads to alone.
        batch_size: most images per batch.
    """

    def __init__(self, run: Callable[[list[DecodedItem], list[Any]], Sequence[R]],
                 padded_hw: Callable[[int, int], tuple[int, int]], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._run_fn, self._padded_hw, self.batch_size = run, padded_hw, batch_size
        self._reset()

    def _reset(self) -> None:
        self._items: list[DecodedItem] = []
        self._payloads: list[Any] = []
        self._pending: dict[tuple[int, int], list[int]] = {}
        self._results: dict[int, R] = {}

    def _run(self, ks: list[int]) -> None:
        res = self._run_fn([self._items[k] for k in ks], [self._payloads[k] for k in ks])
        self._results.update(zip(ks, res))
        # A forward pass frees hundreds of MB of host tensors on CPU; handing them back keeps
        # peak RSS flat over a long job (see release_free_memory).
        release_free_memory()

    def add(self, item: DecodedItem, payload: Any = None) -> None:
        """Queue one usable image (and what its batch needs with it); may run a batch."""
        k = len(self._items)
        self._items.append(item)
        self._payloads.append(payload)
        h, w = item.image.shape[-2:]
        group = self._pending.setdefault(tuple(self._padded_hw(int(h), int(w))), [])
        group.append(k)
        if len(group) == self.batch_size:
            self._run(list(group))
            group.clear()

    def finish(self) -> list[R]:
        """Run the remaining partial batches (by size, in order of first appearance); returns
        the window's results in the order the images were added, and starts a new window."""
        for ks in self._pending.values():
            if ks:
                self._run(list(ks))
        out = [self._results[k] for k in range(len(self._items))]
        self._reset()
        return out


__all__ = ["WindowBatcher"]
