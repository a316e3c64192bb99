"""Where a run's VQA answer vocabulary, targets and layout come from (vlkd.train.build,
vlkd.train.tasks.vqa): built from train + val multiple-choice answers, read from Oscar's pickles,
and a trained model's own head restated by a shared config."""
from __future__ import annotations

import json
import pickle

import pytest

from vlkd.common.config import ConfigError
from vlkd.train import build
from vlkd.train.config import load_config


def _annotations(path, answers: dict[int, str]):
    anns = [{"question_id": qid, "image_id": 1, "multiple_choice_answer": mc,
             "answers": [{"answer": mc, "answer_id": j + 1} for j in range(10)]}
            for qid, mc in answers.items()]
    path.write_text(json.dumps({"annotations": anns}))
    return path


def test_vocabulary_counts_train_and_val_questions(tmp_path):
    train = _annotations(tmp_path / "train.json", {1: "Two", 2: "2", 3: "yes", 4: "cat"})
    val = _annotations(tmp_path / "val.json", {11: "two.", 12: "yes", 13: "dog"})
    cfg = load_config(overrides=[f"data.vqa_annotations={train}",
                                 f"eval.vqa_annotations={val}", "data.answer_min_count=2"])
    # preprocessed: "Two", "2", "two." are "2" (3 questions); "yes" 2; cat, dog 1
    assert build.load_answers(cfg) == ["2", "yes"]
    cfg.data.answer_vocab_annotations = [str(train)]          # the files named explicitly
    assert build.load_answers(cfg) == ["2"]
    cfg.data.answer_min_count = 1
    assert build.load_answers(cfg) == ["2", "cat", "yes"]


def test_vocabulary_needs_multiple_choice_answers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": []}]}))
    cfg = load_config(overrides=[f"data.vqa_annotations={path}"])
    with pytest.raises(ValueError, match="has no 'multiple_choice_answer'.*data.answer_vocab"):
        build.load_answers(cfg)


def test_answer_vocab_reads_oscars_pickles_and_refuses_others(tmp_path):
    (tmp_path / "trainval_ans2label.pkl").write_bytes(pickle.dumps({"no": 1, "yes": 0},
                                                                   protocol=0))
    cfg = load_config(overrides=[f"data.answer_vocab={tmp_path / 'trainval_ans2label.pkl'}"])
    assert build.load_answers(cfg) == ["no", "yes"]           # stored order: Oscar's outputs
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"yes": 0, "f": print}))
    cfg = load_config(overrides=[f"data.answer_vocab={tmp_path / 'evil.pkl'}"])
    with pytest.raises(ConfigError, match=r"evil.pkl: refused: it refers to builtins.print"):
        build.load_answers(cfg)


@pytest.mark.parametrize("key, value", [("data.soft_score", "half"),
                                        ("data.target_answers", "lower"),
                                        ("eval.vqa_metric", "2016"),
                                        ("data.text_layout", "joint")])
def test_vqa_choices_are_checked(key, value):
    from vlkd.train.tasks.vqa import VQATask

    cfg = load_config(overrides=[f"{key}={value}", "task.name=vqa"])
    with pytest.raises(ConfigError, match=f"{key} must be"):
        VQATask.from_config(cfg, encoder=None, num_answers=3)


def test_a_trained_model_accepts_its_own_head_restated(tmp_path):
    from vlkd.train.model import VLConfig, VLModel

    VLModel(VLConfig.preset("tiny", vqa_head="mlp")).save_pretrained(tmp_path / "m")
    model = build.load_model_dir(tmp_path / "m", {"vqa_head": "mlp", "hidden_dropout": 0.3})
    assert model.config.vqa_head == "mlp" and model.config.hidden_dropout == 0.3
    with pytest.raises(ConfigError, match=r"\['vqa_head'\] cannot change.*vqa_head='mlp'"):
        build.load_model_dir(tmp_path / "m", {"vqa_head": "linear"})
