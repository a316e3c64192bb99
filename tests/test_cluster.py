"""Cluster artefacts (issue F) checked without Docker or a scheduler: the Dockerfile parses and
keeps its promises, the job templates parse and only use options the CLIs accept."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster"


def _cli_options(prog: str, sub: str) -> set[str]:
    """Options `prog sub --help` accepts, read from the click command objects."""
    if prog == "vlkd-extract":
        from vlkd.extract.cli import main
    else:
        from vlkd.train.cli import main
    cmd = main.commands.get(sub)
    assert cmd is not None, f"{prog} has no subcommand {sub!r} (templates use it)"
    opts = {"--help", "-h"}
    for p in cmd.params:
        opts.update(o for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])
                    if o.startswith("-"))
    return opts


def _invocations(tokens: list[str]):
    """Yield (prog, sub, options) for each vlkd command line in a token stream."""
    for i, t in enumerate(tokens):
        prog = {"vlkd-extract": "vlkd-extract", "extract": "vlkd-extract",
                "vlkd-train": "vlkd-train", "vlkd.train.cli": "vlkd-train"}.get(t)
        if prog is None or i + 1 >= len(tokens) or tokens[i + 1].startswith("-"):
            continue
        sub = tokens[i + 1].strip('"')
        if sub.startswith("$") or sub in {"proposals|teacher-features"}:
            continue
        opts = []
        for u in tokens[i + 2:]:
            if u in {"vlkd-extract", "vlkd-train", "extract", "-m", "exec", "esac", ";;"}:
                break
            if u.startswith("--"):
                opts.append(u.split("=")[0].rstrip('"'))
        yield prog, sub, opts


def _check(tokens, where):
    found = 0
    for prog, sub, opts in _invocations(tokens):
        allowed = _cli_options(prog, sub)
        bad = [o for o in opts if o not in allowed]
        assert not bad, f"{where}: {prog} {sub} does not accept {bad}"
        found += 1
    return found


def test_dockerfile_pinned_nonroot_entrypoint():
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    base = df.baseimage
    # ARG-substituted base: resolve the default of BASE_IMAGE
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1]
            for i in df.structure if i["instruction"] == "ARG" and "=" in i["value"]}
    base = args.get("BASE_IMAGE", base) if "$" in (base or "") else base
    assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base), base
    assert not base.endswith(":latest")
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    ep = [i["value"] for i in df.structure if i["instruction"] == "ENTRYPOINT"]
    assert ep and "vlkd-entrypoint" in ep[-1]
    # The compiled-ops build covers the cards torch's cu130 wheels run on (sm_75 and newer:
    # A100 8.0, H100 9.0); read from the ENV value itself, not from comments.
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', df.content)
    assert arch, "the Dockerfile sets TORCH_CUDA_ARCH_LIST"
    archs = arch.group(1).replace("+PTX", "").split(";")
    assert {"8.0", "9.0"} <= set(archs) and min(float(a) for a in archs) >= 7.5, archs
    assert "DETECTRON2_COMMIT=" in df.content and re.search(r"DETECTRON2_COMMIT=[0-9a-f]{40}", df.content)
    assert "jre" in df.content                                   # Java for pycocoevalcap
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


@pytest.mark.parametrize("script", sorted(p.name for p in CLUSTER.glob("*.sh")) +
                         ["../docker-entrypoint.sh", "../install.sh"])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_templates_use_accepted_options():
    # slurm_extract.sh builds one argument array for both steps: every long option in it must be
    # accepted by the step(s) that receive it.
    text = (CLUSTER / "slurm_extract.sh").read_text()
    assert "#SBATCH" in text and "--array" in text
    common = re.search(r"COMMON=\((.*?)\)\n", text, re.S).group(1)
    opts = {t for t in shlex.split(common, comments=True) if t.startswith("--")}
    assert {"--images", "--config", "--weights", "--out", "--num-shards", "--shard-index"} <= opts
    for step in ("proposals", "teacher-features"):
        bad = opts - _cli_options("vlkd-extract", step)
        assert not bad, f"slurm_extract.sh: vlkd-extract {step} does not accept {bad}"
    assert "--proposals" in _cli_options("vlkd-extract", "teacher-features")
    # slurm_torchrun.sh hands its arguments to vlkd-train through torchrun
    tr = (CLUSTER / "slurm_torchrun.sh").read_text()
    assert "#SBATCH" in tr and "-m vlkd.train.cli" in tr and '"$@"' in tr


def test_kubernetes_templates_parse_and_use_accepted_options():
    n = 0
    for p in CLUSTER.glob("k8s_*.yaml"):
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
        jobs = [d for d in docs if d["kind"] == "Job"]
        assert jobs, p.name
        for job in jobs:
            assert job["spec"]["completionMode"] == "Indexed"
            for c in job["spec"]["template"]["spec"]["containers"]:
                tokens = list(c.get("command", [])) + list(c.get("args", []))
                tokens = [t for a in tokens for t in (shlex.split(a) if " " in a else [a])]
                n += _check(tokens, p.name)
    assert n >= 2


def test_aws_batch_template_uses_accepted_options():
    spec = json.loads((CLUSTER / "aws_batch_extract.json").read_text())
    assert spec["arrayProperties"]["size"] >= 2
    assert _check(spec["containerOverrides"]["command"], "aws_batch_extract.json") == 1
