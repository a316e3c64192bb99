"""vlkd: compress vision-language transformers by knowledge distillation (DistillVLM).

Packages: ``vlkd.common`` (region-set format), ``vlkd.data`` (images, annotations, synthetic
world), ``vlkd.extract`` (phase one, detectron2), ``vlkd.train`` (phase two, transformers),
``vlkd.infer`` (both, for your own images: ``vlkd.Pipeline.from_pretrained(BUNDLE)(images)``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `import vlkd` stays light (no torch, no detectron2)
    if name == "Pipeline":
        from vlkd.infer.pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'vlkd' has no attribute {name!r}")
