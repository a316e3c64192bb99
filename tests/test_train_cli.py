"""`vlkd-train` end to end on tiny generated region sets: finetune (caption, VQA, pretrain),
distill, evaluate, alignment refusal, and a real SIGKILL followed by --resume."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from train_data import (cli_args, invoke, losses, make_world, metrics, scenes, sigkill_when,
                        train_teacher, write_sets)
from vlkd.train.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    w = make_world(tmp_path_factory.mktemp("cli"))
    w["teacher_model"] = train_teacher(w, w["root"] / "teacher-run", steps=20)
    return w


def _falls(run, window=4):
    ls = losses(run)
    steps = sorted(ls)
    first = sum(ls[s] for s in steps[:window]) / window
    last = sum(ls[s] for s in steps[-window:]) / window
    return first, last


def test_finetune_caption_loss_falls(world, tmp_path):
    run = tmp_path / "cap"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, run, steps=40)])
    first, last = _falls(run)
    assert last < first - 0.3, (first, last)
    cfg = (run / "config.yaml").read_text()
    assert "max_steps: 40" in cfg and "name: caption" in cfg
    for f in ("config.json", "model.safetensors", "vocab.txt", "vlkd_train.json"):
        assert (run / "final" / f).is_file()
    meta = json.loads((run / "final" / "vlkd_train.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle", "star"]


def test_teacher_adaptation_reads_student_tags(world):
    meta = json.loads((world["teacher_model"] / "vlkd_train.json").read_text())
    # trained on the teacher set, whose own class names are "t-...": tags are the student's
    assert meta["class_names"] == ["circle", "square", "triangle", "star"]
    first, last = _falls(world["teacher_model"].parent)
    assert last < first


def test_distill_logs_every_term_and_loss_falls(world, tmp_path):
    run = tmp_path / "dist"
    invoke(["distill", "--task", "caption", "--teacher", world["teacher_model"], "--student",
            "tiny", "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *cli_args(world, run, "--set", "losses.logits.weight=0.5",
                      "--set", "losses.hidden.params.queue_size=64", steps=40)])
    rows = [m for m in metrics(run) if "loss" in m]
    for m in rows:
        assert {"loss/task", "loss/attention", "loss/hidden", "loss/logits"} <= set(m)
        weighted = (m["loss/task"] + m["loss/attention"] + m["loss/hidden"]
                    + 0.5 * m["loss/logits"])
        assert m["loss"] == pytest.approx(weighted, rel=1e-5)
    ls = {m["step"]: m["loss/task"] for m in rows}
    assert sum(ls[s] for s in range(37, 41)) < sum(ls[s] for s in range(1, 5)) - 4 * 0.3
    # the queue of negatives starts empty: the InfoNCE term is 0 at step 1 only
    assert all(m["loss/attention"] > 0 for m in rows) and all(m["loss/hidden"] > 0 for m in rows[1:])


def _distill_error(world, student, teacher, out):
    res = CliRunner().invoke(main, [str(a) for a in [
        "distill", "--task", "caption", "--teacher", world["teacher_model"], "--student", "tiny",
        "--student-regions", student, "--teacher-regions", teacher, *cli_args(world, out)]])
    assert res.exit_code == 2
    assert not (out / "final").exists()
    return res.output


def test_misaligned_sets_are_refused(world, tmp_path):
    sc = world["scenes"]
    # a teacher set whose boxes of one image moved (it records the right proposals set)
    _, shifted = write_sets(tmp_path / "a", sc, shift_teacher_box=sc[3]["image_id"])
    out = _distill_error(world, world["student"], shifted, tmp_path / "x")
    assert f"boxes of 1 images differ" in out and f"'{sc[3]['image_id']}'" in out
    assert "re-run `vlkd-extract teacher-features" in out
    # the world's teacher set with a student set of other images
    other, _ = write_sets(tmp_path / "b", scenes(12, seed=9), teacher=False)
    out = _distill_error(world, other, world["teacher"], tmp_path / "y")
    assert "was pooled over the proposals set" in out and "the boxes differ" in out


def test_vqa_finetune_and_evaluate_official_accuracy(world, tmp_path):
    run = tmp_path / "vqa"
    q, a = world["vqa"]
    eq, ea = world["vqa_val"]
    invoke(["finetune", "--task", "vqa", "--regions", world["student"], "--model", "tiny",
            "--vqa-questions", q, "--vqa-annotations", a, "--set", "data.answer_min_count=1",
            *cli_args(world, run, steps=30)])
    first, last = _falls(run)
    assert last < first
    out = tmp_path / "eval"
    invoke(["evaluate", "--model", run / "final", "--regions", world["student"],
            "--vqa-questions", eq, "--vqa-annotations", ea, "-o", out])
    preds = json.loads((out / "predictions_vqa.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    qs = json.loads(eq.read_text())["questions"]
    anns = {x["question_id"]: x for x in json.loads(ea.read_text())["annotations"]}
    assert sorted(p["question_id"] for p in preds) == sorted(q["question_id"] for q in qs)
    # every question has 8 × its answer and 2 × "other" (see train_data.write_vqa): the official
    # leave-one-out accuracy is 1 for the answer, (2·1/3 + 8·2/3)/10 = 0.6 for "other", else 0
    accs = []
    for p in preds:
        human = [x["answer"] for x in anns[p["question_id"]]["answers"]]
        accs.append(1.0 if p["answer"] == human[0] else 0.6 if p["answer"] == "other" else 0.0)
    assert scores["accuracy"] == pytest.approx(100 * sum(accs) / len(accs))
    assert scores["task"] == "vqa" and scores["num_predictions"] == len(qs)
    assert scores["vqa_metric"] == "current" and "a013f00" in scores["vqa_metric_ref"]
    # Oscar's input layout was recorded and used; the vocabulary is the multiple-choice answers
    meta = json.loads((run / "final" / "vlkd_train.json").read_text())
    assert (meta["text_layout"], meta["max_seq_len"]) == ("pair", 128)
    assert sorted((run / "final" / "answers.txt").read_text().split()) == sorted(
        {x["multiple_choice_answer"] for x in json.loads(a.read_text())["annotations"]})
    legacy = tmp_path / "eval-legacy"
    invoke(["evaluate", "--model", run / "final", "--regions", world["student"],
            "--vqa-questions", eq, "--vqa-annotations", ea, "-o", legacy, "--vqa-metric",
            "legacy"])
    old = json.loads((legacy / "scores.json").read_text())
    # these answers need no normalisation, so both versions agree on them
    assert old["vqa_metric"] == "legacy" and old["accuracy"] == pytest.approx(scores["accuracy"])
    # a model directory written before text layouts existed is evaluated with the old one
    import shutil

    from vlkd.train.config import load_config
    before = tmp_path / "before"
    shutil.copytree(run / "final", before)
    (before / "vlkd_train.json").write_text(json.dumps(
        {k: v for k, v in meta.items() if k not in ("text_layout", "max_seq_len")}))
    invoke(["evaluate", "--model", before, "--regions", world["student"],
            "--vqa-questions", eq, "--vqa-annotations", ea, "-o", tmp_path / "eval-before"])
    assert load_config(tmp_path / "eval-before" / "config.yaml").data.text_layout == "split"
    # the resolved config is saved beside the scores, and loads again
    cfg = load_config(out / "config.yaml")
    assert (cfg.task.name, cfg.model.model) == ("vqa", str(run / "final"))
    assert cfg.eval.regions == cfg.data.regions == str(world["student"])
    assert (cfg.eval.vqa_questions, cfg.eval.vqa_annotations) == (str(eq), str(ea))


def test_logit_kd_refuses_teachers_with_other_answer_lists(world, tmp_path):
    q, a = world["vqa"]
    vqa = ["--task", "vqa", "--vqa-questions", q, "--vqa-annotations", a,
           "--set", "data.answer_min_count=1"]
    invoke(["finetune", "--regions", world["teacher"], "--model", "tiny-teacher", *vqa,
            *cli_args(world, tmp_path / "teacher", steps=2)])
    teacher = tmp_path / "teacher" / "final"
    answers = (teacher / "answers.txt").read_text().split("\n")[:-1]
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join([answers[1], answers[0], *answers[2:]]) + "\n")

    def distill(out, *extra):
        return CliRunner().invoke(main, [str(x) for x in [
            "distill", "--teacher", teacher, "--student", "tiny", "--student-regions",
            world["student"], "--teacher-regions", world["teacher"], *vqa,
            "--set", "losses.logits.weight=1", *cli_args(world, out, *extra, steps=2)]])

    res = distill(tmp_path / "x", "--answer-vocab", swapped)
    assert res.exit_code == 2, res.output
    assert (f"index 0 is {answers[1]!r} for the student and {answers[0]!r} for the teacher"
            in res.output and "answer list" in res.output)
    res = distill(tmp_path / "y", "--answer-vocab", teacher / "answers.txt")
    assert res.exit_code == 0, res.output
    assert "loss/logits" in metrics(tmp_path / "y")[0]


def test_pretrain_runs_mlm_and_matching(world, tmp_path):
    run = tmp_path / "pre"
    invoke(["finetune", "--task", "pretrain", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, run, steps=30)])
    rows = [m for m in metrics(run) if "loss" in m]
    assert {"loss/mlm", "loss/itm"} <= set(rows[0])
    first, last = _falls(run)
    assert last < first
    # VQA fine-tuned from the pre-trained model (Oscar's recipe): its VQA head, never trained,
    # is started anew for this answer vocabulary; every other weight is the pre-trained one
    # (lr 0: one step changes nothing)
    from safetensors.torch import load_file
    q, a = world["vqa"]
    vqa = tmp_path / "vqa-from-pre"
    invoke(["finetune", "--task", "vqa", "--regions", world["student"], "--model", run / "final",
            "--vqa-questions", q, "--vqa-annotations", a, "--set", "data.answer_min_count=1",
            "--set", "optim.lr=0", *cli_args(world, vqa, steps=1)])
    answers = (vqa / "final" / "answers.txt").read_text().split("\n")[:-1]
    pre = load_file(run / "final" / "model.safetensors")
    got = load_file(vqa / "final" / "model.safetensors")
    assert json.loads((run / "final" / "config.json").read_text())["num_answers"] != len(answers)
    assert json.loads((vqa / "final" / "config.json").read_text())["num_answers"] == len(answers)
    assert got["vqa_head.fc2.weight"].shape[0] == len(answers)
    body = [k for k in pre if not k.startswith("vqa_head.")]
    assert body and all(torch.equal(pre[k], got[k]) for k in body)
    w = got["vqa_head.fc1.weight"]
    assert not torch.equal(w, pre["vqa_head.fc1.weight"]) and 0.01 < float(w.std()) < 0.03
    # a VQA model keeps refusing another vocabulary: its head was trained for its own
    other = tmp_path / "other.txt"
    other.write_text("\n".join(answers[:-1]) + "\n")
    res = CliRunner().invoke(main, [str(x) for x in [
        "finetune", "--task", "vqa", "--regions", world["student"], "--model", vqa / "final",
        "--vqa-questions", q, "--vqa-annotations", a, "--answer-vocab", other,
        *cli_args(world, tmp_path / "refused", steps=1)]])
    assert res.exit_code == 2 and "answers.txt" in res.output, res.output


def test_bad_override_is_explained(world, tmp_path):
    res = CliRunner().invoke(main, [str(a) for a in [
        "finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
        *cli_args(world, tmp_path / "z", "--set", "optim.learning_rate=1")]])
    assert res.exit_code == 2
    assert "unknown key 'optim.learning_rate'" in res.output and "'lr'" in res.output


def test_sigkill_then_resume_gives_the_same_losses(world, tmp_path):
    """A real kill (SIGKILL, no cleanup) after the step-4 checkpoint; --resume from it."""
    def args(out, *extra):
        return [str(a) for a in [
            "distill", "--task", "caption", "--teacher", world["teacher_model"], "--student", "tiny",
            "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *cli_args(world, out, "--set", "train.checkpoint_every=4",
                      "--set", "losses.hidden.params.queue_size=64", *extra, steps=60)]]

    killed = tmp_path / "killed"
    ck = killed / "checkpoints" / "step-00000004"
    sigkill_when(args(killed), ck, timeout=120)
    assert not (killed / "final").exists()  # it really died mid-run
    done = max(losses(killed), default=0)
    assert 4 <= done < 60
    # reference and resumed runs in this process (one thread, as the killed one)
    ref = tmp_path / "ref"
    invoke(args(ref))
    invoke(args(killed, "--resume", str(ck)))
    a, b = losses(ref), losses(killed)
    assert sorted(b) == list(range(1, 61))
    assert max(abs(a[s] - b[s]) for s in range(5, 61)) <= 1e-6


@pytest.mark.slow
def test_evaluate_captions_scores_equal_pycocoevalcap(world, tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    run = tmp_path / "cap"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, run, steps=30)])
    out = tmp_path / "eval"
    invoke(["evaluate", "--model", run / "final", "--regions", world["student"], "--captions",
            world["captions"], "--split", "val", "-o", out, "--beam-size", "3",
            "--set", "eval.spice=false"])
    preds = json.loads((out / "predictions_caption.json").read_text())
    assert sorted(str(p["image_id"]) for p in preds) == world["val_ids"]
    assert all(isinstance(p["caption"], str) and p["caption"] for p in preds)
    scores = json.loads((out / "scores.json").read_text())
    data = json.loads(world["captions"].read_text())
    refs = {str(im["cocoid"]): [{"caption": s["raw"]} for s in im["sentences"]]
            for im in data["images"] if im["split"] == "val"}
    res = {str(p["image_id"]): [{"caption": p["caption"]}] for p in preds}
    tok = PTBTokenizer()
    g, r = tok.tokenize(refs), tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(g, r)
    assert scores["Bleu_4"] == pytest.approx(bleu[3])
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(g, r)[0])
    assert scores["ROUGE_L"] == pytest.approx(Rouge().compute_score(g, r)[0])
    assert "METEOR" in scores


def test_loss_options_are_listed_from_the_registry():
    from vlkd.train.losses import describe_losses

    help_text = CliRunner().invoke(main, ["distill", "--help"]).output
    listing = CliRunner().invoke(main, ["losses", "--task", "vqa"])
    assert listing.exit_code == 0, listing.output
    for d in describe_losses():
        assert d["name"] in help_text and d["name"] in listing.output
        for p in d["params"]:
            assert f"{p.name}=" in help_text and f"{p.name}:" in listing.output
    # the defaults a distill run starts from, and where each param is set
    assert "queue_size=4096" in help_text and "temperature=0.07" in help_text
    assert "--set losses.TERM.params.KEY=VALUE" in help_text
    assert "Default terms: distill --task vqa" in listing.output
    assert "logit_kd, weight 0.0, params temperature=1.0, head=vqa" in listing.output


def test_shipped_configs_load_and_options_override_them():
    from pathlib import Path

    from vlkd.train.config import load_config, resolved_losses

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"tiny.yaml", "student.yaml", "teacher.yaml", "distill.yaml"} <= set(names)
    for name in names:
        load_config(root / name)
    cfg = load_config(root / "distill.yaml", ["optim.lr=3e-5", "losses.hidden.weight=2",
                                              "losses.attention.params.layer_map=last"])
    assert cfg.optim.lr == 3e-5 and cfg.model.model == "student"
    terms = resolved_losses(cfg, distill=True)
    # the file's values merged over the defaults, the overrides over the file
    assert terms["hidden"] == {"type": "hidden_infonce", "weight": 2,
                               "params": {"layer_map": "uniform", "queue_size": 4096,
                                          "temperature": 0.07, "proj_dim": 128,
                                          "teacher_projection": "linear"}}
    assert terms["attention"]["params"]["layer_map"] == "last"
    assert terms["task"]["params"] == {"label_smoothing": 0.1}
