"""vlkd: compress vision-language transformers by knowledge distillation (DistillVLM).

Packages: ``vlkd.common`` (region-set format), ``vlkd.data`` (images, annotations, synthetic
world), ``vlkd.extract`` (phase one, detectron2), ``vlkd.train`` (phase two, transformers).
"""

__version__ = "0.1.0"
