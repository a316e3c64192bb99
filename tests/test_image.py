"""The container image (issue L) checked without Docker: the Dockerfile's stages, base images,
labels, environment and user are what docs/CLUSTER.md says; it installs through
scripts/install.sh with the same pins; requirements.lock agrees with what install.sh asks for
and with the environment the tests run in; the entrypoint's caches work for any UID; the smoke
script and the GPU suite only use stages and options that exist."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from configparser import ConfigParser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install.sh"
ENTRY = ROOT / "scripts" / "docker-entrypoint.sh"
SMOKE = ROOT / "scripts" / "docker-smoke.sh"
DOCS = ROOT / "docs" / "CLUSTER.md"
DIGEST = r"@sha256:[0-9a-f]{64}"


@pytest.fixture(scope="module")
def df():
    from dockerfile_parse import DockerfileParser
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def _stages(df) -> dict[str, list[dict]]:
    """Instructions per stage name (``AS name``); ARGs before the first FROM under ''."""
    stages, cur = {"": []}, ""
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", ins["value"], re.I)
            assert m, f"every stage is named: FROM {ins['value']}"
            cur = m.group(2)
            stages[cur] = [ins]
        else:
            stages[cur].append(ins)
    return stages


def _args(instrs) -> dict[str, str | None]:
    out = {}
    for i in instrs:
        if i["instruction"] == "ARG":
            name, eq, default = i["value"].partition("=")
            out[name] = default if eq else None
    return out


def _install_pins() -> dict[str, str]:
    text = INSTALL.read_text()
    pins = {k: re.search(rf'^{k}="([^"]+)"', text, re.M).group(1)
            for k in ("TORCH_PIN", "TV_PIN", "D2_PYPI_PIN")}
    pins["D2_COMMIT"] = re.search(r"VLKD_DETECTRON2_COMMIT:-([0-9a-f]{40})", text).group(1)
    deps = re.search(r"^D2_DEPS=\((.*)\)$", text, re.M).group(1)
    pins["D2_DEPS"] = re.findall(r'"([^"]+)"|(\S+)', deps)
    pins["D2_DEPS"] = [a or b for a, b in pins["D2_DEPS"]]
    return pins


def _lock() -> tuple[dict[str, str], dict[str, str]]:
    """(package -> version, header key -> value) of requirements.lock."""
    pins, header = {}, {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.fullmatch(r"# (\w+): (.+)", line)
        if m:
            header[m.group(1)] = m.group(2)
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[\w.+!-]+", line), \
                f"requirements.lock: {line!r} is not name==version (no URLs, files or extras)"
            name, _, ver = line.partition("==")
            pins[name.lower().replace("_", "-")] = ver
    return pins, header


def test_dockerfile_two_stages_on_pinned_cuda_bases(df):
    st = _stages(df)
    assert list(st)[1:] == ["builder", "runtime"], list(st)
    top = _args(st[""])
    assert st["builder"][0]["value"].startswith("${BUILD_IMAGE}")
    assert st["runtime"][0]["value"].startswith("${BASE_IMAGE}")
    _, header = _lock()
    docs = DOCS.read_text()
    for arg, kind in (("BUILD_IMAGE", "devel"), ("BASE_IMAGE", "runtime")):
        ref = top[arg]
        m = re.fullmatch(rf"nvidia/cuda:(\d+\.\d+)\.\d+-{kind}-ubuntu24\.04({DIGEST})", ref or "")
        assert m, f"{arg}={ref}: an nvidia/cuda {kind} tag pinned by digest"
        assert m.group(1) == header["cuda"], \
            f"{arg} is CUDA {m.group(1)}, torch's wheels in the lock are CUDA {header['cuda']}"
        assert ref in docs, f"docs/CLUSTER.md does not name the base {ref}"
    assert df.baseimage == top["BASE_IMAGE"]


def test_builder_runs_install_sh_with_its_pins(df):
    """One source of truth: the image installs through scripts/install.sh (deps layer, then
    vlkd), with the same detectron2 mode/commit, and pip is called nowhere else."""
    st, pins = _stages(df), _install_pins()
    runs = [i["value"] for i in st["builder"] if i["instruction"] == "RUN"]
    calls = [r for r in runs if "scripts/install.sh" in r]
    assert len(calls) == 2 and "VLKD_DEPS_ONLY=1 bash scripts/install.sh" in calls[0] \
        and calls[1].startswith("bash scripts/install.sh"), calls
    assert not [r for r in runs + [i["value"] for i in st["runtime"] if i["instruction"] == "RUN"]
                if re.search(r"\bpip\d? install\b", r)], "pip install outside install.sh"
    env = {}
    for i in st["builder"]:
        if i["instruction"] == "ENV":
            env.update(re.findall(r'(\w+)=("[^"]*"|\S*)', i["value"]))
    assert env["VLKD_DETECTRON2"] == "${DETECTRON2}"
    assert env["VLKD_DETECTRON2_COMMIT"] == "${DETECTRON2_COMMIT}"
    assert env["VLKD_EXTRAS"] == '""' and env["VLKD_EDITABLE"] == "0"
    assert env["VLKD_VENV"] == "/opt/vlkd/venv"
    for stage in ("builder", "runtime"):
        a = _args(st[stage])
        assert a["DETECTRON2"] == "pypi", "the image's default is what CI tested"
        assert a["DETECTRON2_COMMIT"] == pins["D2_COMMIT"], \
            f"{stage}: DETECTRON2_COMMIT {a['DETECTRON2_COMMIT']} vs install.sh {pins['D2_COMMIT']}"
    copies = [i["value"].split()[0] for i in st["builder"] if i["instruction"] == "COPY"]
    assert "requirements.lock" in " ".join(i["value"] for i in st["builder"]
                                           if i["instruction"] == "COPY")
    assert copies.index("scripts/install.sh") < copies.index("vlkd_pkg"), \
        "the dependency layer is built before the code is copied"
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', df.content).group(1)
    import torch
    wheel_arches = {a.removeprefix("sm_") for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    built = {a.replace(".", "").removesuffix("+PTX") for a in arch.split(";")}
    assert not wheel_arches or built == wheel_arches, \
        f"TORCH_CUDA_ARCH_LIST {arch} vs torch's own {sorted(wheel_arches)}"


def test_labels_name_the_pins(df):
    labels, pins = df.labels, _install_pins()
    _, header = _lock()
    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert labels["org.opencontainers.image.version"] == cfg["metadata"]["version"]
    for key in ("revision", "created", "source", "base.name", "title", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["vlkd.torch"] == pins["TORCH_PIN"].split("==")[1]
    assert labels["vlkd.torchvision"] == pins["TV_PIN"].split("==")[1]
    assert labels["vlkd.detectron2.pypi"] == pins["D2_PYPI_PIN"]
    assert labels["vlkd.detectron2.commit"] == pins["D2_COMMIT"]
    assert labels["vlkd.detectron2"] == "pypi"
    assert labels["vlkd.cuda"] == header["cuda"]
    assert labels["vlkd.python"] == header["python"] == _args(_stages(df)[""])["PYTHON_VERSION"]
    assert header["torch"].split("+")[0] == labels["vlkd.torch"]
    # revision and created come from the build command
    st = _stages(df)
    a = _args(st["runtime"])
    assert labels["org.opencontainers.image.revision"] == a["VCS_REF"]
    smoke = SMOKE.read_text()
    for arg in ("VCS_REF", "BUILD_DATE", "SOURCE_URL"):
        assert f"--build-arg {arg}=" in smoke and arg in a


def test_lock_covers_what_install_sh_asks_for():
    pins, header = _lock()
    ip = _install_pins()
    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    asked = [ip["TORCH_PIN"], ip["TV_PIN"], ip["D2_PYPI_PIN"], *ip["D2_DEPS"]]
    asked += [x for x in cfg["options"]["install_requires"].splitlines() if x.strip()]
    asked += [x for x in cfg["options.extras_require"]["test"].splitlines() if x.strip()]
    for spec in asked:
        req = Requirement(spec.split("#")[0].strip())
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"install.sh asks for {spec} but requirements.lock has no {name}; " \
                             "run `bash scripts/install.sh --lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, install.sh asks for {spec}"
    assert "vlkd" not in pins and "pip" not in pins
    assert header["torch"].split("+")[0] == pins["torch"]
    assert header["cuda"] == re.sub(r"^(\d+)(\d)$", r"\1.\2", header["torch"].split("+cu")[1])
    assert "-c \"$LOCK\"" in INSTALL.read_text(), "install.sh installs under the lock"


def test_installed_environment_is_the_lock():
    """The environment these tests run in is the one the lock and the image pin."""
    pins, header = _lock()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == header["python"]
    drift = []
    for name, want in pins.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue
        if got.split("+")[0] != want:
            drift.append(f"{name} {got} (lock {want})")
    assert not drift, f"the venv drifted from requirements.lock: {drift}; run `make install`"


def test_runtime_environment_caches_user(df):
    st = _stages(df)["runtime"]
    env = {}
    for i in st:
        if i["instruction"] == "ENV":
            env.update(re.findall(r'(\w+)=("[^"]*"|\S*)', i["value"]))
    cache = env["VLKD_CACHE"]
    assert cache.startswith("/tmp/"), "a path Apptainer's read-only image still lets us write"
    entry = ENTRY.read_text()
    assert f"image_cache={cache} " in entry, "the entrypoint knows the image's VLKD_CACHE"
    pairs = dict(re.findall(r"(\w+)=(\w+)", re.search(r"for pair in (.*?); do", entry, re.S)
                            .group(1)))
    assert set(pairs) == {"HF_HOME", "TORCH_HOME", "MPLCONFIGDIR", "FVCORE_CACHE",
                          "XDG_CACHE_HOME", "TRITON_CACHE_DIR"}
    for var, sub in pairs.items():
        assert env[var] == f"{cache}/{sub}", f"{var}={env.get(var)}: not {cache}/{sub}"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"].startswith("/opt/vlkd/venv/bin")
    users = [i["value"] for i in st if i["instruction"] == "USER"]
    assert users == ["vlkd"]
    run = " ".join(i["value"] for i in st if i["instruction"] == "RUN")
    assert "useradd --create-home --uid 1000 vlkd" in run and "chmod 1777 /out" in run
    assert [i["value"] for i in st if i["instruction"] == "WORKDIR"][-1] == "/out"
    ep = json.loads([i["value"] for i in st if i["instruction"] == "ENTRYPOINT"][-1])
    assert ep == ["tini", "-s", "--", "vlkd-entrypoint"]
    copied = [i["value"] for i in st if i["instruction"] == "COPY"]
    assert "scripts/docker-entrypoint.sh /usr/local/bin/vlkd-entrypoint" in copied
    assert "--from=builder /opt/vlkd/venv /opt/vlkd/venv" in copied


def test_dockerignore_keeps_what_the_dockerfile_copies(df):
    ignore = [x for x in (ROOT / ".dockerignore").read_text().split() if not x.startswith("#")]
    assert ".git" in ignore and ".venv" in ignore
    for i in df.structure:
        if i["instruction"] != "COPY" or "--from=" in i["value"]:
            continue
        *srcs, _dst = i["value"].split()
        for src in srcs:
            top = src.split("/")[0]
            assert top not in ignore and src not in ignore, f".dockerignore drops {src}"
            assert (ROOT / src).exists(), f"COPY {src}: no such path"


def test_entrypoint_caches_for_any_uid(tmp_path):
    cache = tmp_path / "cache"
    env = {"PATH": os.environ["PATH"], "VLKD_CACHE": str(cache),
           "HF_HOME": "/tmp/vlkd-cache/huggingface",        # the image default: follows
           "TORCH_HOME": str(tmp_path / "mine"),            # set by the user: kept
           "HOME": str(tmp_path / "no-such-home")}          # what --user 12345 gets: moved
    r = subprocess.run(["bash", str(ENTRY), "env"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert got["HF_HOME"] == f"{cache}/huggingface" and got["MPLCONFIGDIR"] == f"{cache}/matplotlib"
    assert got["TORCH_HOME"] == str(tmp_path / "mine")
    assert got["HOME"] == f"{cache}/home"
    for sub in ("huggingface", "matplotlib", "fvcore", "xdg", "triton", "home"):
        assert (cache / sub).is_dir(), sub
    # outside the image (no VLKD_CACHE) the environment is left alone
    r = subprocess.run(["bash", str(ENTRY), "env"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, timeout=60)
    assert "HF_HOME=" not in r.stdout and f"HOME={tmp_path}" in r.stdout


@pytest.mark.parametrize("script", [SMOKE, INSTALL, ENTRY])
def test_scripts_parse_and_pass_shellcheck(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_smoke_script_runs_real_demo_stages(tmp_path):
    """The stages docker-smoke.sh runs inside the container are the quick demo's."""
    from vlkd.demo.pipeline import Demo

    text = SMOKE.read_text()
    order = ast.literal_eval(re.search(r"^order = (\[.*?\])$", text, re.M | re.S).group(1))
    assert re.search(r"^train = order\[-1\]$", text, re.M)
    train = order[-1]
    demo = Demo(tmp_path / "demo", quick=True)
    demo.plan()
    stages = {st.name: st for st in demo.log}
    missing = [n for n in order if n not in stages]
    assert not missing, f"docker-smoke.sh runs stages the demo no longer has: {missing}"
    for n in order:   # each stage's inputs come from stages run before it
        assert set(stages[n].after) <= set(order[:order.index(n)]), (n, stages[n].after)
    assert "--max-steps" in stages[train].argv
    for flag in ("--read-only", "--tmpfs /tmp", '--user "$UIDGID"'):
        assert flag in text, flag


def test_docs_show_the_commands(df):
    docs = DOCS.read_text()
    for cmd in ("scripts/docker-smoke.sh", "apptainer build", "docker-daemon://",
                "docker://", "apptainer exec --nv", "--bind", "docker run --rm --gpus all",
                "--user 12345", "VLKD_CACHE", "requirements.lock", "--build-arg DETECTRON2=git",
                "benchmarks/gpu_suite.py"):
        assert cmd in docs, f"docs/CLUSTER.md does not show {cmd!r}"
    declared = set()
    for stage in _stages(df).values():
        declared |= set(_args(stage))
    for arg in set(re.findall(r"--build-arg (\w+)=", docs)):
        assert arg in declared, f"docs/CLUSTER.md passes --build-arg {arg}, the Dockerfile has no ARG"


def _plan(*extra) -> list[dict]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run",
                        *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["gpu", "quick"])
def test_gpu_suite_uses_only_options_the_benchmarks_accept(mode):
    """Every option the suite passes exists, except those it reports as missing (then the step
    is listed as blocked, not run)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_suite import accepted_options
    finally:
        sys.path.pop(0)
    steps = _plan(*(["--quick"] if mode == "quick" else []))
    assert {s["group"] for s in steps} == {"amp", "distill_step", "extract", "loader"}
    for s in steps:
        script = Path(s["argv"][1])
        opts = accepted_options(script)
        used = {a for a in s["argv"][2:] if a.startswith("--")}
        assert set(s["params"]["missing"]) == (set(s["needs"]) - opts)
        unknown = used - opts - set(s["params"]["missing"])
        assert not unknown, f"{s['name']}: {script.name} does not accept {sorted(unknown)}"
