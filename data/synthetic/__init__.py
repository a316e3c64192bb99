"""A synthetic vision-language world in which every stage of vlkd runs for real and can be judged.

Scenes are flat-coloured shapes (circle, square, triangle, star, diamond, cross) in six colours
and three sizes, 1-5 per image, with occlusion and background clutter; captions and VQA
questions are derived from the same scene description that drew the pixels. The package:

- :mod:`.scene`: the scene model (:class:`Scene`, :class:`SceneObject`) and the renderer;
- :mod:`.grammar`: captions, questions and the human answers to them;
- :mod:`.writers`: :func:`make_scene` (one image and its text) and :func:`generate` (the COCO
  instances and captions, Karpathy split, VQA v2 and scene files of every split);
- :mod:`.cli`: ``python -m vlkd.data.synthetic``.

For each split the generator writes, under ``out_dir``::

    images/{split}/{image_id}.png                          the images
    annotations/instances_{split}.json                     COCO instances (detector training)
    annotations/captions_{split}.json                      COCO captions, 5 per image
    annotations/dataset_coco.json                          Karpathy-style split file (all splits)
    annotations/v2_OpenEnded_synthetic_{split}_questions.json   VQA v2 questions
    annotations/v2_synthetic_{split}_annotations.json      VQA v2 annotations, 10 answers each
    annotations/scenes_{split}.json                        the scene metadata the rest derives from
    synthetic_info.json                                    parameters, counts, vocabulary

Image ids are integers in every JSON (``1_000_000 + i`` for train, ``2_000_000 + i`` for val,
``3_000_000 + i`` for test) and the file of image ``k`` is ``{k}.png``, so every image source
(COCO JSON, Karpathy JSON, folder) and every annotation reader agree on the key ``str(k)``.

Everything is a function of ``(seed, split, index)``: image ``i`` of a split is drawn from its own
``numpy.random.Generator``, so the same seed gives the same bytes, and the val/test images do not
change when ``num_train`` does. The grammar of captions and questions is in docs/SYNTHETIC.md.

Run ``python -m vlkd.data.synthetic --out DIR --num-train 800 --num-val 200 --num-test 200``.
"""
from .cli import main
from .grammar import (ANSWER_SPACE, ANSWERS_PER_QUESTION, CAPTIONS_PER_IMAGE, NUMBER_WORDS,
                      OPPOSITE, PLURALS, QUESTION_TYPES, QUESTIONS_PER_IMAGE, human_answers,
                      make_captions, make_questions, relation)
from .scene import (COLORS, MIN_VISIBLE, SHAPES, SIZE_RADIUS, SIZES, Scene, SceneObject,
                    render_scene, shape_mask, shape_polygon)
from .writers import (FORMAT_VERSION, SPLIT_ID_BASE, SPLITS, generate, image_id_for, make_scene,
                      paths_for)

__all__ = [
    # the scene model and renderer
    "SHAPES", "COLORS", "SIZES", "SIZE_RADIUS", "MIN_VISIBLE", "SceneObject", "Scene",
    "shape_polygon", "shape_mask", "render_scene",
    # the grammar
    "PLURALS", "NUMBER_WORDS", "OPPOSITE", "CAPTIONS_PER_IMAGE", "QUESTIONS_PER_IMAGE",
    "ANSWERS_PER_QUESTION", "QUESTION_TYPES", "ANSWER_SPACE", "relation", "make_captions",
    "make_questions", "human_answers",
    # the files
    "SPLITS", "SPLIT_ID_BASE", "FORMAT_VERSION", "image_id_for", "make_scene", "paths_for",
    "generate", "main",
]
