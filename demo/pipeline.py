"""The embedded default, end to end, through the real commands.

Each stage is one command line (``vlkd-extract …``, ``vlkd-train …``) run as a subprocess, so
the demo exercises exactly what a user runs and needs neither phase's internals. A stage that
finished writes ``<stage dir>/.done`` (with its wall time); a re-run skips it. Stages form a
graph and independent ones run at the same time (``--jobs``, default one per core), each with
the config's fixed ``threads``, so that no result depends on ``--jobs``:

    data ─┬→ detector (student) → proposals (student) ─┬→ teacher-features (VTA) → validate
          └→ detector (teacher) ─┬─────────────────────────┘
                                 └→ proposals (teacher, its own boxes)
    per task: teacher on own boxes ─┬→ + N steps on the student's boxes (VTA) → student with KD
                                    └→ + N steps on its own boxes (the control)
              student without KD (needs only the tokenizer)
              evaluate each model as soon as it is trained
    → pictures; latency of every model (alone: nothing runs beside it) → report.md
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlkd.common.config import save, to_dict
from vlkd.common.machine import cpu_count

from .config import DemoConfig, load_config

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
    after: list[str] = field(default_factory=list)
    exclusive: bool = False         # runs with no other stage beside it (latency)
    preload: bool = True            # started from the preloader (False: imports little)
    seconds: float = 0.0
    skipped: bool = False


def _stage_env(threads: int) -> dict[str, str]:
    """A stage's environment (also the preloader's, which imports what the stages use)."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _sets(keys: dict) -> list[str]:
    """``vlkd-train`` config keys as its ``--set key=value`` options."""
    return [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]


@dataclass
class Demo:
    """The demo's stage graph and how it runs.

    Attributes:
        out: the output folder.
        quick: the config's ``quick`` size instead of ``full``.
        jobs: stages run at once (None: the config's ``jobs``; 0: one per core, at most 4).
        config: the demo config (default ``configs/demo/demo.yaml``).
        overrides: ``--set key=value`` overrides of the config.
        preload: start stages from a process that has imported torch, transformers and
            detectron2 once (:mod:`vlkd.demo.preload`) instead of as fresh interpreters.
        cfg: the resolved :class:`~vlkd.demo.config.DemoConfig`, saved as ``out/config.yaml``.
        scale: the size in use, ``cfg.quick`` or ``cfg.full``.
        raw, size: ``cfg`` and ``scale`` as plain dicts (read by the report and benchmarks).
    """

    out: Path
    quick: bool = False
    jobs: int | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    preload: bool = True
    log: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        self.cfg_root = configs_dir()
        self.config = Path(self.config or self.cfg_root / "demo" / "demo.yaml").resolve()
        self.cfg: DemoConfig = load_config(self.config, self.overrides, self.jobs)
        self.scale = self.cfg.size(self.quick)
        self.raw = to_dict(self.cfg)
        self.size = self.raw["quick" if self.quick else "full"]
        self.cores = cpu_count()
        self.jobs = self.cfg.jobs or min(4, self.cores)
        self.t0 = time.time()
        self._lock = threading.Lock()
        self.preloader = None

    # -------------------------------------------------------------------------------- running
    def say(self, msg: str) -> None:
        el = time.time() - self.t0
        with self._lock:
            print(f"[vlkd-demo {int(el // 60):02d}:{int(el % 60):02d}] {msg}", file=sys.stderr,
                  flush=True)

    def stage(self, name: str, argv: list[str], out: Path, after: tuple[str, ...] = (),
              exclusive: bool = False, preload: bool = True) -> str:
        """Adds a stage that may start once the stages named in ``after`` have finished; an
        ``exclusive`` one starts only when no other stage runs, and none starts beside it;
        ``preload=False`` runs it as a fresh process even when the demo preloads."""
        known = {st.name for st in self.log}
        missing = [a for a in after if a not in known]
        if missing or name in known:
            raise ValueError(f"stage {name!r}: unknown dependencies {missing} or a duplicate name")
        self.log.append(Stage(name, argv, out, list(after), exclusive, preload=preload))
        return name

    def _run(self, st: Stage, threads: int) -> None:
        done = st.out / ".done"
        if done.exists():
            rec = json.loads(done.read_text())
            if rec.get("planned", st.argv) != st.argv:
                raise RuntimeError(
                    f"stage {st.name} finished before with other arguments (another config or "
                    f"size?) in {self.out}.\n  then: {shlex.join(rec['planned'])}\n  now:  "
                    f"{shlex.join(st.argv)}\nUse another --out, or --clean to start over.")
            st.skipped = True
            st.seconds = rec.get("seconds", 0.0)
            self.say(f"{st.name}: done before ({st.seconds:.0f} s), skipped")
            return
        st.out.mkdir(parents=True, exist_ok=True)
        argv = [str(threads) if i and st.argv[i - 1] == "--num-threads" else a
                for i, a in enumerate(st.argv)]
        self.say(f"{st.name}: started ({threads} thread{'s' * (threads > 1)}); "
                 f"log {st.out / 'stage.log'}")
        env = _stage_env(threads)
        preloaded = self.preloader is not None and st.preload
        if preloaded and not self.preloader.ready():
            self.say(f"{st.name}: waits for the preloader's imports")
            self.preloader.ready(None)
        t = last = time.time()
        with open(st.out / "stage.log", "w") as logf:
            logf.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
            if preloaded:
                logf.write("# started from the preloaded process (vlkd-demo --no-preload: "
                           "a fresh one)\n")
                logf.flush()
                proc = self.preloader.start(argv, env)
            else:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                # the terminal gets errors and one progress line per stage every ~15 s
                low = line.lower()
                progress = any(k in low for k in ("it/s", "img/s", "%|", "step", "eta:"))
                if "error" in low or (progress and time.time() - last >= 15):
                    last = time.time()
                    self.say(f"  {st.name}: {line.strip()[:140]}")
            rc = proc.wait()
        st.seconds = time.time() - t
        if rc != 0:
            tail = (st.out / "stage.log").read_text().splitlines()[-25:]
            raise RuntimeError(f"stage {st.name} failed (exit {rc}) after {st.seconds:.0f} s; "
                               f"log: {st.out / 'stage.log'}\n" + "\n".join(tail))
        done.write_text(json.dumps({"seconds": st.seconds, "argv": argv, "planned": st.argv}))
        self.say(f"{st.name}: ok in {st.seconds:.0f} s")

    def execute(self) -> None:
        """Runs the stages in dependency order, up to ``jobs`` at a time, each with the
        config's ``threads``; an exclusive stage runs alone. After a failure no new stage
        starts; the running ones finish, then the first error is raised."""
        # Of the stages ready to start, the one heading the longest chain of stages still to
        # come goes first (then the one added first): the chains teacher → adapted teacher →
        # distilled student → evaluation are the demo's critical path.
        chain: dict[str, int] = {}
        for st in reversed(self.log):       # dependants are added after what they need
            chain[st.name] = 1 + max((chain[d.name] for d in self.log if st.name in d.after),
                                     default=0)
        order = {st.name: i for i, st in enumerate(self.log)}
        stages = {st.name: st for st in self.log}
        pending = sorted(self.log, key=lambda st: (-chain[st.name], order[st.name]))
        if self.preload and any(not st.out.joinpath(".done").exists() for st in self.log):
            from .preload import Preloader
            self.preloader = Preloader(_stage_env(self.cfg.threads))
            self.say("preloader started: torch, transformers and detectron2 are imported once "
                     "for the stages that start after it is ready (--no-preload: every stage "
                     "a fresh process)")
        try:
            self._schedule(pending, stages)
        finally:
            if self.preloader is not None:
                self.preloader.close()
                self.preloader = None

    def _schedule(self, pending: list[Stage], stages: dict[str, Stage]) -> None:
        finished: set[str] = set()
        running: dict[str, threading.Thread] = {}
        errors: list[BaseException] = []
        cond = threading.Condition()

        def work(st: Stage, threads: int) -> None:
            try:
                self._run(st, threads)
            except BaseException as e:  # noqa: BLE001 (re-raised by execute)
                errors.append(e)
            with cond:
                running.pop(st.name, None)
                if not errors:
                    finished.add(st.name)
                cond.notify_all()

        with cond:
            while pending or running:
                ready = [st for st in pending if all(a in finished for a in st.after)]
                if errors or (not ready and not running):
                    if not running:
                        break
                    cond.wait()
                    continue
                alone = any(stages[name].exclusive for name in running)
                # an exclusive stage waits until nothing runs; the others go first meanwhile
                ready = [st for st in ready if not st.exclusive or not running]
                if alone or len(running) >= self.jobs or not ready:
                    cond.wait()
                    continue
                st = ready[0]
                # A fixed thread count, the same whatever --jobs is and whatever runs beside
                # it: results computed with other thread counts differ in the last bits, and
                # training from scratch amplifies those (docs/DEMO.md, "Reproducibility").
                pending.remove(st)
                th = threading.Thread(target=work, args=(st, self.cfg.threads), daemon=True)
                running[st.name] = th
                th.start()
        if errors:
            raise errors[0]
        if pending:
            raise RuntimeError("stages never became ready: " + ", ".join(s.name for s in pending))

    # -------------------------------------------------------------------------------- stages
    def _train_args(self, task: str, seed: int) -> list[str]:
        P = self.paths
        return ["--task", task, "--tokenizer", str(P["tok"]),
                "--batch-size", str(self.scale.batch_size), "--seed", str(seed),
                *self._annotations(task, "train"), *_sets(self.cfg.train)]

    def _annotations(self, task: str, split: str) -> list[str]:
        P = self.paths
        if task == "caption":
            return ["--captions", str(P["karpathy"]), "--split", split]
        return ["--vqa-questions", str(P["ann"] / f"v2_OpenEnded_synthetic_{split}_questions.json"),
                "--vqa-annotations", str(P["ann"] / f"v2_synthetic_{split}_annotations.json")]

    def evaluate(self, task: str, key: str, run: Path, regions: Path, trained: str) -> str:
        """Scores ``run``'s model on the test split into ``eval/<key>-<task>/scores.json``."""
        s, P = self.scale, self.paths
        e = P["evals"] / f"{key}-{task}"
        extra = ["--tag-regions", str(P["reg"] / "student")] if regions.name == "teacher-vta" else []
        return self.stage(f"{task}: evaluate {key}", [
            str(BIN / "vlkd-train"), "evaluate", "--model", str(self.model_dir(run)),
            "--regions", str(regions), "--task", task, *self._annotations(task, "test"), *extra,
            "--output-dir", str(e), "--set", f"eval.max_samples={s.eval_max_samples}",
            "--set", f"eval.beam_size={self.cfg.train.get('eval.beam_size', 5)}"], e,
            after=(trained, "teacher-features"))

    def add_students(self, task: str, seed: int, suffix: str = "") -> tuple[str, str]:
        """The student without and with KD (same data, steps and seed) and their evaluations,
        as ``runs/student-{base,kd}<suffix>-<task>``; returns the two evaluation stages."""
        kd = self.add_student(task, seed, suffix, kd=True)   # first: it is on the critical path
        return self.add_student(task, seed, suffix, kd=False), kd

    def add_student(self, task: str, seed: int, suffix: str = "", kd: bool = True,
                    kd_sets: dict | None = None) -> str:
        """One student run and its evaluation; with ``kd``, distilled from this task's VTA
        teacher with ``distill_losses`` updated by ``kd_sets`` (an ablation). The run is
        ``runs/student-{base,kd}<suffix>-<task>``; returns its evaluation stage."""
        s, P, m = self.scale, self.paths, self.cfg.models
        tr, stu = str(BIN / "vlkd-train"), P["reg"] / "student"
        key = f"student-{'kd' if kd else 'base'}{suffix}"
        run = P["runs"] / f"{key}-{task}"
        args = ["--max-steps", str(s.steps.student), "--output-dir", str(run),
                *self._train_args(task, seed)]
        if kd:
            losses = dict(self.cfg.distill_losses)
            for k in kd_sets or {}:     # a new loss type drops the old type's params
                if k.endswith(".type"):
                    term = k[: -len("type")]
                    losses = {kk: v for kk, v in losses.items()
                              if not kk.startswith(term + "params.")}
            losses.update(kd_sets or {})
            trained = self.stage(f"{task}: student with KD{suffix}", [
                tr, "distill", "--teacher", str(self.model_dir(P["runs"] / f"teacher-vta-{task}")),
                "--student", m.student, "--student-regions", str(stu),
                "--teacher-regions", str(P["reg"] / "teacher-vta"), *args,
                *_sets(losses)],
                run, after=(f"{task}: teacher adapted to student boxes (VTA)",))
        else:
            trained = self.stage(f"{task}: student without KD{suffix}", [
                tr, "finetune", "--model", m.student, "--regions", str(stu), *args],
                run, after=("tokenizer",))
        return self.evaluate(task, key, run, stu, trained)

    def pipeline(self) -> Path:
        self.plan()
        self.say(f"{len(self.log)} stages, up to {self.jobs} at a time on {self.cores} "
                 f"core{'s' * (self.cores > 1)}; output {self.out}")
        self.execute()
        # written once every stage has run with it (a refused re-run leaves the old one)
        save(self.cfg, self.out)
        from vlkd.demo.report import write_report
        report = write_report(self)
        self.say(f"report: {report}  (total {time.time() - self.t0:.0f} s)")
        return report

    def plan(self) -> None:
        """Adds every stage with what it needs; :meth:`execute` runs them."""
        o, s, c = self.out, self.scale, self.cfg_root
        ex, tr = str(BIN / "vlkd-extract"), str(BIN / "vlkd-train")
        d = s.data
        data = o / "data"
        self.stage("data", [sys.executable, "-m", "vlkd.data.synthetic", "--out", str(data),
                            "--num-train", str(d.num_train), "--num-val", str(d.num_val),
                            "--num-test", str(d.num_test), "--seed", str(d.seed)], data,
                   preload=False)   # numpy and PIL only: it runs while the preloader imports
        ann = data / "annotations"
        karpathy = ann / "dataset_coco.json"

        # The two detectors train at the same time, one thread each when there are 2 cores:
        # much faster than one after the other with two threads (docs/SYNTHETIC.md).
        dets = {}
        for role in ("teacher", "student"):
            dd = dets[role] = o / "detectors" / role
            self.stage(f"detector-{role}", [
                ex, "train-detector", "--config", str(c / "demo" / f"{role}_detector.yaml"),
                "--train-json", str(ann / "instances_train.json"),
                "--image-root", str(data / "images" / "train"),
                "--val-json", str(ann / "instances_val.json"),
                "--val-image-root", str(data / "images" / "val"),
                "--out", str(dd), "--max-iter", str(getattr(s.detector_iters, role)),
                "--num-threads", "1"], dd, after=("data",))

        reg = o / "regions"
        # Karpathy filepath is "images/<split>", relative to the data root
        images = ["--images", str(karpathy), "--image-root", str(data)]
        det_args = lambda r: ["--config", str(dets[r] / "config.yaml"),  # noqa: E731
                              "--weights", str(dets[r] / "model_final.pth")]
        common = ["--num-shards", "2", "--shard-index", "all", "--num-workers", "0",
                  "--no-progress"]
        stu = self.stage("proposals-student", [ex, "proposals", *images, *det_args("student"),
                                               "--out", str(reg / "student"), *common],
                         reg / "student", after=("detector-student",))
        vta = self.stage("teacher-features", [
            ex, "teacher-features", "--proposals", str(reg / "student"), *images,
            *det_args("teacher"), "--out", str(reg / "teacher-vta"), *common],
            reg / "teacher-vta", after=(stu, "detector-teacher"))
        own = self.stage("proposals-teacher", [ex, "proposals", *images, *det_args("teacher"),
                                               "--out", str(reg / "teacher-own"), *common],
                         reg / "teacher-own", after=("detector-teacher",))
        self.stage("validate", [ex, "validate", str(reg / "teacher-vta"), "--against",
                                str(reg / "student")], o / "validate", after=(vta,))
        tok = o / "tokenizer"
        self.stage("tokenizer", [tr, "build-vocab", str(ann / "captions_train.json"),
                                 str(ann / "v2_OpenEnded_synthetic_train_questions.json"),
                                 "--out", str(tok), "--vocab-size", "2000", "--min-frequency",
                                 "1", "--regions", str(reg / "student")], tok, after=(stu,))

        self.paths = dict(data=data, ann=ann, karpathy=karpathy, reg=reg, tok=tok,
                          runs=o / "runs", evals=o / "eval")
        runs, vta_set = o / "runs", reg / "teacher-vta"
        m = self.cfg.models
        for task in self.cfg.tasks:
            t_own = runs / f"teacher-own-{task}"
            st_own = self.stage(f"{task}: teacher on its own boxes", [
                tr, "finetune", "--model", m.teacher, "--regions", str(reg / "teacher-own"),
                "--max-steps", str(s.steps.teacher), "--output-dir", str(t_own),
                *self._train_args(task, d.seed)], t_own, after=(own, "tokenizer"))
            self.evaluate(task, "teacher-own", t_own, reg / "teacher-own", st_own)
            self.evaluate(task, "teacher-own-on-student-boxes", t_own, vta_set, st_own)
            self.add_teacher_pair(task, d.seed)
            self.add_students(task, d.seed)

        # pictures: boxes of one test image (student tags | teacher tags over the same boxes,
        # and the teacher's own boxes), teacher vs distilled-student attention maps
        pics = o / "pictures"
        self.stage("picture: boxes", [
            ex, "inspect", str(reg / "student"), "--with", str(reg / "teacher-vta"),
            "--unaligned", str(reg / "teacher-own"), "--image-id", str(self.picture_image()),
            *images, "--max-boxes", str(self.cfg.picture_boxes), "--draw",
            str(o / "boxes.png")], pics / "boxes", after=(vta, own))
        if "caption" in self.cfg.tasks:
            self.stage("picture: attention", [
                tr, "show-attention", "--teacher", str(self.model_dir(runs / "teacher-vta-caption")),
                "--student", str(self.model_dir(runs / "student-kd-caption")),
                "--student-regions", str(reg / "student"),
                "--teacher-regions", str(reg / "teacher-vta"), "--captions", str(karpathy),
                "--split", "test", "--out", str(o / "attention.png")], pics / "attention",
                after=("caption: student with KD",))
        self.add_latency()
        if "caption" in self.cfg.tasks:
            self.add_pipeline_latency()

    def add_teacher_pair(self, task: str, seed: int, suffix: str = "") -> tuple[str, str]:
        """Visual Token Alignment and its control: the teacher trained on its own boxes, then
        ``teacher_adapt`` more steps on the student's boxes (VTA) or, the control, the same
        steps on its own boxes; both evaluated on the student's boxes, so that their difference
        is what the boxes of the extra steps do. ``seed`` sets both runs' seed and data order
        (the starting teacher is the same). Runs ``runs/teacher-{vta,ctrl}<suffix>-<task>``;
        returns the two evaluation stages."""
        s, P = self.scale, self.paths
        tr, own = str(BIN / "vlkd-train"), P["runs"] / f"teacher-own-{task}"
        out = []
        for key, regions, name in (
                ("vta", "teacher-vta", f"{task}: teacher adapted to student boxes (VTA){suffix}"),
                ("ctrl", "teacher-own",
                 f"{task}: teacher + adaptation steps on its own boxes (control){suffix}")):
            run = P["runs"] / f"teacher-{key}{suffix}-{task}"
            trained = self.stage(name, [
                tr, "finetune", "--model", str(self.model_dir(own)),
                "--regions", str(P["reg"] / regions), "--max-steps", str(s.steps.teacher_adapt),
                "--output-dir", str(run), *self._train_args(task, seed)], run,
                after=(f"{task}: teacher on its own boxes", "teacher-features"))
            out.append(self.evaluate(task, f"teacher-{key}{suffix}" + (
                "-on-student-boxes" if key == "ctrl" else ""), run, P["reg"] / "teacher-vta",
                trained))
        return out[0], out[1]

    def latency_runs(self) -> list[tuple[str, str, Path, Path]]:
        """(task, setting, model directory, region set) of every model the report shows."""
        P = self.paths
        stu, vta, own = (P["reg"] / n for n in ("student", "teacher-vta", "teacher-own"))
        rows = []
        for task in self.cfg.tasks:
            r = lambda k: self.model_dir(P["runs"] / f"{k}-{task}")  # noqa: E731
            rows += [(task, "teacher-own", r("teacher-own"), own),
                     (task, "teacher-own-on-student-boxes", r("teacher-own"), vta),
                     (task, "teacher-ctrl-on-student-boxes", r("teacher-ctrl"), vta),
                     (task, "teacher-vta", r("teacher-vta"), vta),
                     (task, "student-base", r("student-base"), stu),
                     (task, "student-kd", r("student-kd"), stu)]
        return rows

    def add_latency(self) -> str:
        """The last stage: every model's latency, measured alone (an exclusive stage) with
        the same samples, batch, beam, repeats and threads (``vlkd-train latency``)."""
        lat = self.scale.latency
        argv = [str(BIN / "vlkd-train"), "latency", "--output-dir", str(self.out / "latency"),
                "--samples", str(lat.samples), "--batch-size", str(lat.batch_size),
                "--beam-size", str(self.cfg.train.get("eval.beam_size", 5)),
                "--repeats", str(lat.repeats), "--threads", str(self.cfg.threads)]
        for task in self.cfg.tasks:
            argv += self._annotations(task, "test")
        for task, key, model, regions in self.latency_runs():
            argv += ["--run", task, key, str(model), str(regions)]
        evals = [st.name for st in self.log if ": evaluate " in st.name]
        return self.stage("latency", argv, self.out / "latency", after=tuple(evals),
                          exclusive=True)

    def add_pipeline_latency(self) -> list[str]:
        """The deployed pipelines, detector and VL model end to end from the image file: the
        student's (student detector + distilled student) and the teacher's (teacher detector
        + the teacher trained on its boxes), each exported as a bundle (``vlkd-train export``)
        whose card measures its latency; exclusive stages, like the latency stage."""
        lat, P, names = self.scale.latency, self.paths, []
        for role, model in (("student", "student-kd"), ("teacher", "teacher-own")):
            regions = P["reg"] / ("student" if role == "student" else "teacher-own")
            det, out = self.out / "detectors" / role, self.out / "bundles" / role
            names.append(self.stage(f"pipeline latency: {role} (caption)", [
                str(BIN / "vlkd-train"), "export", "--detector", str(det),
                "--model", str(self.model_dir(P["runs"] / f"{model}-caption")),
                "--regions", str(regions), "--out", str(out / "bundle"),
                "--latency-images", str(lat.pipeline_images),
                "--latency-repeats", str(lat.repeats), "--threads", str(self.cfg.threads),
                "--set", f"beam_size={self.cfg.train.get('eval.beam_size', 5)}"], out,
                after=("latency",), exclusive=True))
        return names

    def picture_image(self) -> int:
        """The test image boxes.png shows: of the first 20, the first with the most objects
        among those not much wider than tall (read from the world's generator, so the plan
        does not wait for the data)."""
        from vlkd.data.synthetic import image_id_for, make_scene

        d = self.scale.data
        scenes = [make_scene(d.seed, "test", i)[1] for i in range(min(20, d.num_test))]
        rank = [(min(s.width, s.height) >= 0.6 * max(s.width, s.height), len(s.objects), -i)
                for i, s in enumerate(scenes)]
        return image_id_for("test", -max(rank)[2] if rank else 0)

    @staticmethod
    def model_dir(run_dir: Path) -> Path:
        """The model a finished training run leaves (``vlkd-train`` writes it last)."""
        return run_dir / "final"


def run_demo(out: str, quick: bool, clean: bool = False, jobs: int | None = None,
             config: str | None = None, overrides: tuple[str, ...] = (),
             preload: bool = True) -> Path:
    demo = Demo(Path(out), quick=quick, jobs=jobs, config=Path(config) if config else None,
                overrides=tuple(overrides), preload=preload)
    if clean and demo.out.exists():
        shutil.rmtree(demo.out)
    return demo.pipeline()
