"""`vlkd-infer`: your own images to captions and answers through a pipeline bundle.

The one place where phase one's detector (``vlkd.extract``) and phase two's VL model
(``vlkd.train``) run together, in one process, through their public APIs: a bundle
(:mod:`vlkd.infer.bundle`, written by ``vlkd-train export``) holds both;
:class:`~vlkd.infer.pipeline.Pipeline` runs images through them; :mod:`vlkd.infer.cli` is the
command line. docs/INFER.md describes all of it.

``Pipeline`` is imported on first use, so that ``vlkd-infer --help`` does not load torch.
"""
from __future__ import annotations

__all__ = ["Pipeline", "Bundle", "export_bundle"]


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    if name in ("Bundle", "export_bundle"):
        from . import bundle
        return getattr(bundle, name)
    raise AttributeError(f"module 'vlkd.infer' has no attribute {name!r}")
