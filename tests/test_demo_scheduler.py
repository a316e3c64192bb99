"""The demo's stage graph: dependency order, stages side by side, thread shares, failures and
skipping on a re-run. Stages here are tiny Python processes that record when they ran."""
import json
import sys

import pytest

import functools

from vlkd.demo.pipeline import Demo

# the scheduler's own behaviour, with plain subprocesses (tests/test_demo_preload.py and the
# quick demo of tests/test_demo.py cover the preloaded path)
_Demo = functools.partial(Demo, preload=False)

STAGE = """
import json, os, sys, time
t0 = time.time()
time.sleep(float(sys.argv[2]))
json.dump({"start": t0, "end": time.time(), "threads": os.environ["OMP_NUM_THREADS"],
           "argv": sys.argv[1:]}, open(sys.argv[1], "w"))
sys.exit(int(sys.argv[3]))
"""


def _stage(demo, tmp_path, name, after=(), sleep=0.6, rc=0, exclusive=False):
    out = tmp_path / "stages" / name
    rec = tmp_path / f"{name}.json"
    demo.stage(name, [sys.executable, "-c", STAGE, str(rec), str(sleep), str(rc),
                      "--num-threads", "1"], out, after=after, exclusive=exclusive)
    return rec


def _diamond(tmp_path, jobs, rc_b=0):
    demo = _Demo(tmp_path / "out", jobs=jobs)
    recs = {"a": _stage(demo, tmp_path, "a")}
    recs["b"] = _stage(demo, tmp_path, "b", after=("a",), rc=rc_b, sleep=0.2 if rc_b else 0.6)
    recs["c"] = _stage(demo, tmp_path, "c", after=("a",), sleep=1.2)
    recs["d"] = _stage(demo, tmp_path, "d", after=("b", "c"))
    return demo, recs


def test_order_parallelism_and_thread_shares(tmp_path):
    demo, recs = _diamond(tmp_path, jobs=2)
    demo.execute()
    r = {k: json.loads(p.read_text()) for k, p in recs.items()}
    assert r["a"]["end"] <= min(r["b"]["start"], r["c"]["start"])
    assert r["b"]["start"] < r["c"]["end"] and r["c"]["start"] < r["b"]["end"]  # side by side
    assert r["d"]["start"] >= max(r["b"]["end"], r["c"]["end"])
    # the config's fixed thread count, alone or not, so results do not depend on what ran
    # beside them or on --jobs
    assert {int(x["threads"]) for x in r.values()} == {demo.cfg.threads} == {1}
    assert all(st.seconds > 0 and not st.skipped for st in demo.log)
    assert all((st.out / ".done").exists() and (st.out / "stage.log").exists()
               for st in demo.log)

    # a re-run (a fresh process would build the same graph) runs nothing again
    before = {k: p.read_text() for k, p in recs.items()}
    demo2, _ = _diamond(tmp_path, jobs=2)
    demo2.execute()
    assert all(st.skipped for st in demo2.log)
    assert {k: p.read_text() for k, p in recs.items()} == before


def test_one_job_runs_stages_one_after_another(tmp_path):
    demo, recs = _diamond(tmp_path, jobs=1)
    demo.execute()
    spans = sorted((json.loads(p.read_text())["start"], json.loads(p.read_text())["end"])
                   for p in recs.values())
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))


def test_what_a_stage_gets_does_not_depend_on_jobs(tmp_path):
    """--jobs changes when stages run, never what they run with: the same command line (the
    --num-threads value included) and the same thread environment. With every stage
    deterministic, the demo's scores are then the same for any --jobs (docs/DEMO.md)."""
    seen = []
    for jobs in (1, 3):
        demo, recs = _diamond(tmp_path / f"jobs{jobs}", jobs=jobs)
        demo.execute()
        got = {k: json.loads(p.read_text()) for k, p in recs.items()}
        seen.append({k: (v["threads"], [a for a in v["argv"] if "jobs" not in a])
                     for k, v in got.items()})
    assert seen[0] == seen[1]
    assert {v[0] for v in seen[0].values()} == {"1"}
    assert all(v[1][-2:] == ["--num-threads", "1"] for v in seen[0].values())

    # and with threads: 2 in the config, every stage gets 2 whatever --jobs is
    for jobs in (1, 2):
        demo = _Demo(tmp_path / f"t{jobs}", jobs=jobs, overrides=("threads=2",))
        rec = _stage(demo, tmp_path / f"t{jobs}", "a", sleep=0.0)
        demo.execute()
        r = json.loads(rec.read_text())
        assert r["threads"] == "2" and r["argv"][-2:] == ["--num-threads", "2"]


def test_an_exclusive_stage_runs_alone(tmp_path):
    """The latency stage's rule: it starts only when nothing runs, and nothing starts while it
    runs, though other stages are ready and --jobs would allow them."""
    demo = _Demo(tmp_path / "out", jobs=3)
    recs = {"a": _stage(demo, tmp_path, "a", sleep=0.1)}
    recs["x"] = _stage(demo, tmp_path, "x", after=("a",), sleep=0.6, exclusive=True)
    for name in ("b", "c", "d"):
        recs[name] = _stage(demo, tmp_path, name, after=("a",), sleep=0.4)
    demo.execute()
    r = {k: json.loads(p.read_text()) for k, p in recs.items()}
    x = r.pop("x")
    for k, v in r.items():
        assert v["end"] <= x["start"] or v["start"] >= x["end"], k
    assert r["b"]["start"] < r["c"]["end"] and r["c"]["start"] < r["b"]["end"]  # others in parallel


def test_failure_stops_new_stages_and_keeps_finished_ones(tmp_path):
    demo, recs = _diamond(tmp_path, jobs=2, rc_b=3)
    with pytest.raises(RuntimeError) as e:
        demo.execute()
    msg = str(e.value)
    assert "stage b failed (exit 3)" in msg and str(tmp_path / "stages" / "b" / "stage.log") in msg
    st = {s.name: s for s in demo.log}
    assert (st["a"].out / ".done").exists()
    assert (st["c"].out / ".done").exists()           # running when b failed: allowed to finish
    assert not (st["b"].out / ".done").exists()
    assert not recs["d"].exists() and not (st["d"].out / ".done").exists()


def test_unknown_dependency_and_duplicate_are_refused(tmp_path):
    demo = _Demo(tmp_path / "out", jobs=1)
    _stage(demo, tmp_path, "a")
    with pytest.raises(ValueError, match="unknown dependencies \\['x'\\]"):
        _stage(demo, tmp_path, "b", after=("x",))
    with pytest.raises(ValueError, match="duplicate"):
        _stage(demo, tmp_path, "a")


def test_demo_plan_is_a_valid_graph(tmp_path):
    """The real demo's stages: every dependency names an earlier stage, and each training
    or evaluation stage waits for what it reads."""
    demo = _Demo(tmp_path / "out", quick=True)
    demo.plan()
    names = [s.name for s in demo.log]
    assert len(names) == len(set(names))
    st = {s.name: s for s in demo.log}
    assert "caption: teacher adapted to student boxes (VTA)" in st["caption: student with KD"].after
    assert "teacher-features" in st["caption: teacher adapted to student boxes (VTA)"].after
    assert st["caption: student without KD"].after == ["tokenizer"]
    assert "caption: student with KD" in st["caption: evaluate student-kd"].after
    assert set(st["teacher-features"].after) == {"proposals-student", "detector-teacher"}
    # the VTA control: the same teacher, the same extra steps and seed, on its own boxes;
    # evaluated on the student's boxes like the adapted teacher
    for task in ("caption", "vqa"):
        vta = st[f"{task}: teacher adapted to student boxes (VTA)"].argv
        ctrl = st[f"{task}: teacher + adaptation steps on its own boxes (control)"].argv
        diff = [(a, b) for a, b in zip(vta, ctrl) if a != b]
        assert len(vta) == len(ctrl) and diff == [
            (str(demo.out / "regions/teacher-vta"), str(demo.out / "regions/teacher-own")),
            (str(demo.out / f"runs/teacher-vta-{task}"),
             str(demo.out / f"runs/teacher-ctrl-{task}"))]
        ev = st[f"{task}: evaluate teacher-ctrl-on-student-boxes"].argv
        assert ev[ev.index("--regions") + 1] == str(demo.out / "regions/teacher-vta")
    # latency: last, alone, every evaluated model of both tasks
    lat = st["latency"]
    assert {s.name for s in demo.log if s.exclusive} == {
        "latency", "pipeline latency: student (caption)", "pipeline latency: teacher (caption)"}
    for role, model, regions in (("student", "student-kd", "student"),
                                 ("teacher", "teacher-own", "teacher-own")):
        ex = st[f"pipeline latency: {role} (caption)"].argv
        assert ex[1] == "export" and ex[ex.index("--detector") + 1] == str(
            demo.out / "detectors" / role)
        assert ex[ex.index("--model") + 1] == str(demo.out / f"runs/{model}-caption/final")
        assert ex[ex.index("--regions") + 1] == str(demo.out / "regions" / regions)
    assert {a for a in lat.after} == {n for n in names if ": evaluate " in n}
    runs = [lat.argv[i + 1:i + 5] for i, a in enumerate(lat.argv) if a == "--run"]
    assert len(runs) == 12 and {r[0] for r in runs} == {"caption", "vqa"}
    assert lat.argv[lat.argv.index("--threads") + 1] == "1"
    box = st["picture: boxes"].argv
    assert box[box.index("--unaligned") + 1] == str(demo.out / "regions/teacher-own")


def test_rerun_with_other_arguments_is_refused(tmp_path):
    demo, recs = _diamond(tmp_path, jobs=2)
    demo.execute()
    before = recs["c"].read_text()
    demo2 = _Demo(tmp_path / "out", jobs=2)
    _stage(demo2, tmp_path, "a")
    _stage(demo2, tmp_path, "c", after=("a",), sleep=0.3)     # c planned differently now
    with pytest.raises(RuntimeError, match="stage c finished before with other arguments") as e:
        demo2.execute()
    assert "--clean" in str(e.value)
    assert recs["c"].read_text() == before                   # nothing re-ran over it


def test_bad_demo_config_names_what_is_missing(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("full: {data: {num_train: 10}}\ntasks: [caption, vqa]\n")
    with pytest.raises(RuntimeError, match=r"missing quick, models, full\.detector_iters"):
        _Demo(tmp_path / "out", config=cfg)
    cfg.write_text("full: [1\n")
    with pytest.raises(RuntimeError, match="not valid YAML"):
        _Demo(tmp_path / "out", config=cfg)


def test_the_head_of_the_longest_chain_starts_first(tmp_path):
    """a and b are both ready; b heads b → c → d (3 stages), so with one job b runs before a,
    though a was added first; then c (chain 2) before a (1); then a before d (both 1: the one
    added first)."""
    demo = _Demo(tmp_path / "out", jobs=1)
    recs = {"a": _stage(demo, tmp_path, "a", sleep=0.1)}
    recs["b"] = _stage(demo, tmp_path, "b", sleep=0.1)
    recs["c"] = _stage(demo, tmp_path, "c", after=("b",), sleep=0.1)
    recs["d"] = _stage(demo, tmp_path, "d", after=("c",), sleep=0.1)
    demo.execute()
    start = {k: json.loads(p.read_text())["start"] for k, p in recs.items()}
    assert sorted(start, key=start.get) == ["b", "c", "a", "d"]


def _demo_yaml() -> str:
    from vlkd.demo.pipeline import configs_dir

    return (configs_dir() / "demo" / "demo.yaml").read_text()


def test_demo_config_refuses_unknown_keys_naming_the_valid_ones(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(_demo_yaml().replace("  batch_size: 16", "  batch_size: 16\n  batchsize: 8"))
    with pytest.raises(RuntimeError, match=r"unknown key 'quick\.batchsize'; valid keys in "
                                           r"'quick': \['batch_size', 'data'"):
        _Demo(tmp_path / "out", config=cfg)
    with pytest.raises(RuntimeError, match=r"--set quick\.step\.student=3: unknown key "
                                           r"'quick\.step'.*'steps'"):
        _Demo(tmp_path / "out", overrides=("quick.step.student=3",))
    with pytest.raises(RuntimeError, match=r"quick\.batch_size: Value 'many'"):
        _Demo(tmp_path / "out", overrides=("quick.batch_size=many",))
    for tasks in ("[caption, captions]", "[]"):
        with pytest.raises(RuntimeError, match=r"tasks must be a non-empty subset of "
                                               r"\[caption, vqa\]"):
            _Demo(tmp_path / "out", overrides=(f"tasks={tasks}",))


def test_missing_keys_filled_by_set_are_not_reported(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("full: {data: {num_train: 10}}\ntasks: [caption, vqa]\n")
    with pytest.raises(RuntimeError, match=r"missing quick, full\.detector_iters, full\.steps, "
                                           r"full\.batch_size, full\.eval_max_samples, "
                                           r"models\.student, full\.data\.num_val") as e:
        _Demo(tmp_path / "out", config=cfg, overrides=("models.teacher=tiny",))
    assert "models.teacher" not in str(e.value)


def test_set_overrides_reach_the_planned_commands(tmp_path):
    demo = _Demo(tmp_path / "out", quick=True, jobs=3, overrides=(
        "quick.steps.student=7", "train.optim.lr=0.002",
        "distill_losses.losses.attention.weight=0", "tasks=[caption]"))
    assert demo.jobs == 3 and demo.cfg.jobs == 3
    demo.plan()
    st = {s.name: s for s in demo.log}
    kd = st["caption: student with KD"].argv
    assert kd[kd.index("--max-steps") + 1] == "7"
    sets = [kd[i + 1] for i, a in enumerate(kd) if a == "--set"]
    # a nested --set lands on the file's dotted key: one value, the override's
    assert "optim.lr=0.002" in sets and not any(s.startswith("optim.lr=0.001") for s in sets)
    assert "losses.attention.weight=0" in sets and "losses.attention.weight=1.0" not in sets
    assert "losses.hidden.params.queue_size=1024" in sets
    assert not any(name.startswith("vqa:") for name in st)
    assert demo.size["steps"]["student"] == 7 and demo.raw["tasks"] == ["caption"]


def test_resolved_config_is_saved_beside_the_output(tmp_path, monkeypatch):
    import vlkd.demo.report
    from vlkd.demo.config import load_config

    monkeypatch.setattr(Demo, "plan", lambda self: _stage(self, tmp_path, "a", sleep=0.0))
    monkeypatch.setattr(vlkd.demo.report, "write_report", lambda demo: demo.out / "report.md")
    demo = _Demo(tmp_path / "out", jobs=1, overrides=("full.batch_size=5", "train.optim.lr=0.01"))
    demo.pipeline()
    saved = tmp_path / "out" / "config.yaml"
    again = load_config(saved)
    assert again == demo.cfg and again.full.batch_size == 5
    assert again.train["optim.lr"] == 0.01 and again.jobs == 1


def test_cli_options_set_and_jobs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import vlkd.demo.pipeline
    from vlkd.demo.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for flag in ("--out", "--quick", "--clean", "--jobs", "--config", "--set KEY=VALUE",
                 "--preload / --no-preload"):
        assert flag in r.output
    assert "[jobs; default: 0]" in " ".join(r.output.split())

    seen = {}
    monkeypatch.setattr(vlkd.demo.pipeline, "run_demo",
                        lambda *a, **k: seen.setdefault("args", (a, k)) and tmp_path / "report.md")
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "o"), "--jobs", "2", "--set", "a=1",
                                  "--set", "b.c=2"])
    assert r.exit_code == 0, r.output
    assert seen["args"] == ((str(tmp_path / "o"), False, False, 2, None, ("a=1", "b.c=2")),
                            {"preload": True})
    seen.clear()
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "o"), "--no-preload"])
    assert r.exit_code == 0, r.output
    assert seen["args"][1] == {"preload": False}

    monkeypatch.undo()
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "o"), "--set", "quick.stepz=1"])
    assert r.exit_code == 1 and "unknown key 'quick.stepz'" in r.output
    assert not (tmp_path / "o").exists()


def test_kd_gain_adds_seeds_with_the_vta_control_and_writes_its_table(tmp_path, monkeypatch):
    """kd_gain over seeds 0, 1: seed 1 gets its own students and its own adaptation/control
    pair from the same teacher; the table has KD and VTA rows for both tasks, with the sign
    count, and goes to kd_gain.md / kd_gain.json beside the demo."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "kd_gain", Path(__file__).resolve().parents[1] / "benchmarks" / "kd_gain.py")
    kd_gain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kd_gain)
    planned = {}

    def fake_execute(self):                      # every evaluation writes a made-up score
        for st in self.log:
            planned[st.name] = st
            if ": evaluate " in st.name:
                out = Path(st.argv[st.argv.index("--output-dir") + 1])
                out.mkdir(parents=True, exist_ok=True)
                key = out.name
                v = 0.3 + (0.2 if "kd" in key or "vta" in key else 0.0) + 0.01 * ("seed1" in key)
                (out / "scores.json").write_text(json.dumps({"CIDEr": v, "accuracy": 100 * v}))

    monkeypatch.setattr(Demo, "execute", fake_execute)
    res = kd_gain.run(tmp_path / "out", True, [0, 1], 2, None)
    seed1 = [n for n in planned if n.endswith("-seed1")]
    assert "caption: teacher adapted to student boxes (VTA)-seed1" in seed1
    assert "vqa: teacher + adaptation steps on its own boxes (control)-seed1" in seed1
    ctrl = planned["caption: teacher + adaptation steps on its own boxes (control)-seed1"].argv
    assert ctrl[ctrl.index("--seed") + 1] == "1"
    assert ctrl[ctrl.index("--model") + 1].endswith("runs/teacher-own-caption/final")
    for task in ("caption", "vqa"):
        assert set(res["tasks"][task]) == {"KD", "VTA"}
        vta = res["tasks"][task]["VTA"]
        assert [r["seed"] for r in vta["rows"]] == [0, 1] and vta["wins"] == 2
    text = kd_gain.table(res)
    assert "| caption | CIDEr | VTA | mean |" in text and "| vqa | VQA acc. | KD | 1 |" in text
    assert "caption VTA: +" in text and "(n=2; 2/2 seeds positive)" in text
    md = kd_gain.write_table(res, tmp_path / "out")
    assert text in md.read_text()
    assert json.loads((tmp_path / "out" / "kd_gain.json").read_text())["seeds"] == [0, 1]
