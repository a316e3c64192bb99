"""The embedded default, end to end, through the real commands.

Each stage is one command line (``vlkd-extract …``, ``vlkd-train …``) run as a subprocess, so
the demo exercises exactly what a user runs and needs neither phase's internals. A stage that
finished writes ``<stage dir>/.done`` (with its wall time); a re-run skips it. Stage order:

    data → detectors (student, teacher) → proposals (student) → teacher-features (VTA)
    → proposals (teacher, its own boxes) → tokenizer
    → per task: teacher on own boxes → teacher adapted on student boxes (VTA)
                → student baseline → student distilled → evaluations
    → report.md + PNGs
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def configs_dir() -> Path:
    """The repository's configs/ (editable install or source tree), or $VLKD_CONFIGS."""
    env = os.environ.get("VLKD_CONFIGS")
    cands = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1] / "configs",
                                            Path.cwd() / "configs", Path("/opt/vlkd/configs")]
    for c in cands:
        if (c / "demo" / "demo.yaml").is_file():
            return c
    raise FileNotFoundError("configs/demo/demo.yaml not found; run from the vlkd checkout or set "
                            "VLKD_CONFIGS to its configs/ folder")


@dataclass
class Stage:
    name: str
    argv: list[str]
    out: Path                       # the stage's own folder; .done goes there
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class Demo:
    out: Path
    quick: bool = False
    threads: int = 2
    log: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        self.cfg_root = configs_dir()
        raw = yaml.safe_load((self.cfg_root / "demo" / "demo.yaml").read_text())
        self.size = raw["quick" if self.quick else "full"]
        self.raw = raw
        self.t0 = time.time()

    # -------------------------------------------------------------------------------- running
    def say(self, msg: str) -> None:
        el = time.time() - self.t0
        print(f"[vlkd-demo {int(el // 60):02d}:{int(el % 60):02d}] {msg}", file=sys.stderr,
              flush=True)

    def run(self, name: str, argv: list[str], out: Path) -> Stage:
        st = Stage(name, argv, out)
        done = out / ".done"
        if done.exists():
            st.skipped = True
            st.seconds = json.loads(done.read_text()).get("seconds", 0.0)
            self.say(f"{name}: done before ({st.seconds:.0f} s), skipped")
            self.log.append(st)
            return st
        out.mkdir(parents=True, exist_ok=True)
        self.say(f"{name}: {' '.join(shlex.quote(a) for a in argv)}")
        threads = "1" if "--num-threads" in argv else str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t = time.time()
        with open(out / "stage.log", "w") as logf:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                # keep the terminal readable: progress lines and errors only
                low = line.lower()
                if "error" in low or "it/s" in low or "img/s" in low or "%|" in line:
                    print(f"    {line.rstrip()[:160]}", file=sys.stderr, flush=True)
            rc = proc.wait()
        st.seconds = time.time() - t
        if rc != 0:
            tail = (out / "stage.log").read_text().splitlines()[-25:]
            raise RuntimeError(f"stage {name} failed (exit {rc}) after {st.seconds:.0f} s; "
                               f"log: {out / 'stage.log'}\n" + "\n".join(tail))
        done.write_text(json.dumps({"seconds": st.seconds, "argv": argv}))
        self.say(f"{name}: ok in {st.seconds:.0f} s")
        self.log.append(st)
        return st

    def run_parallel(self, jobs: list[tuple[str, list[str], Path]]) -> None:
        """Run independent stages at the same time (each as :meth:`run` would)."""
        import threading

        errors: list[BaseException] = []

        def one(job):
            try:
                self.run(*job)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)

        threads = [threading.Thread(target=one, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # -------------------------------------------------------------------------------- stages
    def pipeline(self) -> Path:
        o, s, c = self.out, self.size, self.cfg_root
        ex, tr = str(BIN / "vlkd-extract"), str(BIN / "vlkd-train")
        d = s["data"]
        data = o / "data"
        self.run("data", [sys.executable, "-m", "vlkd.data.synthetic", "--out", str(data),
                          "--num-train", str(d["num_train"]), "--num-val", str(d["num_val"]),
                          "--num-test", str(d["num_test"]), "--seed", str(d["seed"])], data)
        ann = data / "annotations"
        karpathy = ann / "dataset_coco.json"

        # The two detectors train at the same time, one thread each: on 2 cores that is much
        # faster than one after the other with two threads (docs/SYNTHETIC.md).
        dets, jobs = {}, []
        for role in ("student", "teacher"):
            dd = o / "detectors" / role
            jobs.append((f"detector-{role}", [
                ex, "train-detector", "--config", str(c / "demo" / f"{role}_detector.yaml"),
                "--train-json", str(ann / "instances_train.json"),
                "--image-root", str(data / "images" / "train"),
                "--val-json", str(ann / "instances_val.json"),
                "--val-image-root", str(data / "images" / "val"),
                "--out", str(dd), "--max-iter", str(s["detector_iters"][role]),
                "--num-threads", "1"], dd))
            dets[role] = dd
        self.run_parallel(jobs)

        reg = o / "regions"
        # Karpathy filepath is "images/<split>", relative to the data root
        images = ["--images", str(karpathy), "--image-root", str(data)]
        det_args = lambda r: ["--config", str(dets[r] / "config.yaml"),  # noqa: E731
                              "--weights", str(dets[r] / "model_final.pth")]
        common = ["--num-shards", "2", "--shard-index", "all", "--num-workers", "0",
                  "--no-progress"]
        self.run("proposals-student", [ex, "proposals", *images, *det_args("student"),
                                       "--out", str(reg / "student"), *common], reg / "student")
        self.run("teacher-features", [ex, "teacher-features", "--proposals", str(reg / "student"),
                                      *images, *det_args("teacher"),
                                      "--out", str(reg / "teacher-vta"), *common],
                 reg / "teacher-vta")
        self.run("proposals-teacher", [ex, "proposals", *images, *det_args("teacher"),
                                       "--out", str(reg / "teacher-own"), *common],
                 reg / "teacher-own")
        self.run("validate", [ex, "validate", str(reg / "teacher-vta"), "--against",
                              str(reg / "student")], o / "validate")
        tok = o / "tokenizer"
        self.run("tokenizer", [tr, "build-vocab", str(ann / "captions_train.json"),
                               str(ann / "v2_OpenEnded_synthetic_train_questions.json"),
                               "--out", str(tok), "--vocab-size", "2000", "--min-frequency", "1",
                               "--regions", str(reg / "student")], tok)

        sets = [f"{k}={v}" for k, v in self.raw.get("train", {}).items()]
        kd_sets = [f"{k}={v}" for k, v in self.raw.get("distill_losses", {}).items()]
        runs, evals = o / "runs", o / "eval"
        for task in self.raw["tasks"]:
            def annotations(split: str) -> list[str]:
                if task == "caption":
                    return ["--captions", str(karpathy), "--split", split]
                return ["--vqa-questions", str(ann / f"v2_OpenEnded_synthetic_{split}_questions.json"),
                        "--vqa-annotations", str(ann / f"v2_synthetic_{split}_annotations.json")]

            data_args = annotations("train")
            base = ["--task", task, "--tokenizer", str(tok), "--batch-size", str(s["batch_size"]),
                    "--seed", str(d["seed"]), *data_args,
                    *[a for kv in sets for a in ("--set", kv)]]
            m = self.raw["models"]
            t_own = runs / f"teacher-own-{task}"
            self.run(f"{task}: teacher on its own boxes", [
                tr, "finetune", "--model", m["teacher"], "--regions", str(reg / "teacher-own"),
                "--max-steps", str(s["steps"]["teacher"]), "--output-dir", str(t_own), *base],
                t_own)
            t_vta = runs / f"teacher-vta-{task}"
            self.run(f"{task}: teacher adapted to student boxes (VTA)", [
                tr, "finetune", "--model", str(self.model_dir(t_own)),
                "--regions", str(reg / "teacher-vta"),
                "--max-steps", str(s["steps"]["teacher_adapt"]), "--output-dir", str(t_vta),
                *base], t_vta)
            s_base = runs / f"student-base-{task}"
            self.run(f"{task}: student without KD", [
                tr, "finetune", "--model", m["student"], "--regions", str(reg / "student"),
                "--max-steps", str(s["steps"]["student"]), "--output-dir", str(s_base), *base],
                s_base)
            s_kd = runs / f"student-kd-{task}"
            self.run(f"{task}: student with KD", [
                tr, "distill", "--teacher", str(self.model_dir(t_vta)), "--student", m["student"],
                "--student-regions", str(reg / "student"),
                "--teacher-regions", str(reg / "teacher-vta"),
                "--max-steps", str(s["steps"]["student"]), "--output-dir", str(s_kd), *base,
                *[a for kv in kd_sets for a in ("--set", kv)]], s_kd)

            ev_data = annotations("test")
            ev_sets = ["--set", f"eval.max_samples={s['eval_max_samples']}", "--set",
                       f"eval.beam_size={self.raw['train'].get('eval.beam_size', 5)}"]
            for key, model, regions in [
                ("teacher-own", t_own, reg / "teacher-own"),
                ("teacher-own-on-student-boxes", t_own, reg / "teacher-vta"),
                ("teacher-vta", t_vta, reg / "teacher-vta"),
                ("student-base", s_base, reg / "student"),
                ("student-kd", s_kd, reg / "student"),
            ]:
                e = evals / f"{key}-{task}"
                extra = (["--tag-regions", str(reg / "student")]
                         if regions.name == "teacher-vta" else [])
                self.run(f"{task}: evaluate {key}", [
                    tr, "evaluate", "--model", str(self.model_dir(model)), "--regions", str(regions),
                    "--task", task, *ev_data, *extra, "--output-dir", str(e), *ev_sets], e)

        # pictures: boxes of one test image (student tags | teacher tags over the same boxes),
        # teacher vs distilled-student attention maps on one test caption
        test_ids = sorted(str(im["id"]) for im in
                          json.loads((ann / "captions_test.json").read_text())["images"])
        pics = o / "pictures"
        self.run("picture: boxes", [ex, "inspect", str(reg / "student"), "--with",
                                    str(reg / "teacher-vta"), "--image-id", test_ids[0],
                                    *images, "--draw", str(o / "boxes.png")], pics / "boxes")
        if "caption" in self.raw["tasks"]:
            self.run("picture: attention", [
                tr, "show-attention", "--teacher", str(self.model_dir(runs / "teacher-vta-caption")),
                "--student", str(self.model_dir(runs / "student-kd-caption")),
                "--student-regions", str(reg / "student"),
                "--teacher-regions", str(reg / "teacher-vta"), "--captions", str(karpathy),
                "--split", "test", "--out", str(o / "attention.png")], pics / "attention")

        from vlkd.demo.report import write_report
        report = write_report(self)
        self.say(f"report: {report}  (total {time.time() - self.t0:.0f} s)")
        return report

    @staticmethod
    def model_dir(run_dir: Path) -> Path:
        """The model a finished training run leaves: its final model directory."""
        for name in ("final", "best", "model"):
            if (run_dir / name / "config.json").exists():
                return run_dir / name
        return run_dir / "final"


def run_demo(out: str, quick: bool, clean: bool = False) -> Path:
    if clean and Path(out).exists():
        shutil.rmtree(out)
    return Demo(Path(out), quick=quick).pipeline()
