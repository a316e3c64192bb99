"""`vlkd-extract import-tsv`: Oscar/VinVL, BUTD/LXMERT and SGB TSV files into region sets.

Fixtures are the anchors' layouts, fabricated with tests/test_tsv.py's builders (tiny widths,
random values): VinVL feature.tsv / label.tsv / hw.tsv with .lineidx, SGB predictions.tsv as
tsv_writer writes it, BUTD and LXMERT rows as csv.DictWriter writes them. The import runs on
the shard-job scaffold: sharded, resumable after SIGKILL, stopped by SIGTERM at a window
boundary, every unusable row a recorded failure.
"""
from __future__ import annotations

import base64
import json
import signal
import sys

import numpy as np
import pytest
import yaml

from extract_fixtures import assert_same_shards, invoke_extract, sigkill_after_first_commit
from test_preemption_extract import signal_mid_job
from test_tsv import (D, _butd_items, _csv_dictwriter_file, _hw_line, _images,
                      _label_line, _sgb_tsv_writer, _vinvl_feature_line, _vinvl_files,
                      _write_lines)
from vlkd.common.config import field_default, load
from vlkd.common.manifest import read_manifest
from vlkd.common.regionset import RegionSet
from vlkd.common.validate import validate_region_set
from vlkd.data.tsv import (BUTD_FIELDS, LXMERT_FIELDS, lineidx_path, make_geometry,
                           scan_line_starts, write_lineidx)
from vlkd.extract.alignment import verify_proposals_shard
from vlkd.extract.cli import main
from vlkd.extract.import_tsv import (FILL_CLASS_NAME, WARNINGS_DIR, ImportTsvError,
                                     read_vocabulary, run_import_tsv, warnings_path)
from vlkd.extract.options import PER_JOB_KEYS, SET_CONFIG_FILE, ImportTsvConfig
from vlkd.extract.progress import Progress

QUIET = ["--no-progress", "--num-workers", "0"]


def errors(set_dir, **kw):
    return [f for f in validate_region_set(set_dir, **kw) if f.level == "error"]


def imp(*args, expect=0):
    return invoke_extract(["import-tsv", *[str(a) for a in args]], expect=expect)


def warnings_of(set_dir, index=0, num_shards=1):
    path = warnings_path(set_dir, index, num_shards)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _full(img, dtype=np.float32):
    return np.concatenate([img["features"], make_geometry(img["boxes"], img["hw"])],
                          1).astype(dtype)


def _troubled_vinvl(tmp_path):
    """VinVL files with every kind of trouble: an image without regions, a label row with
    another box count, undecodable base64, a repeated key, a non-UTF-8 key, a blank row."""
    images = _images(seed=3, counts=(3, 0, 4, 2, 5, 1, 2))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    keys = list(images)
    lines = feat.read_text().splitlines()
    lines[3] = lines[3][:-12] + lines[3][-11:]                   # base64 cut by one
    lines.append(_vinvl_feature_line(keys[0], _full(images[keys[0]])))  # a repeated key
    lines.append("")                                                # a blank row
    _write_lines(feat, lines)
    raw = feat.read_bytes() + b"\xff\xfe" + _vinvl_feature_line(
        "x", _full(images[keys[5]])).encode() + b"\n"               # a non-UTF-8 key
    feat.write_bytes(raw)
    write_lineidx(lineidx_path(feat), scan_line_starts(feat))   # Oscar's, byte offsets
    img4 = images[keys[4]]
    short = dict(img4, boxes=img4["boxes"][:2], names=img4["names"][:2],
                 scores=img4["scores"][:2])
    _write_lines(labels, [_label_line(k, short if k == keys[4] else v)
                          for k, v in images.items()])
    return images, keys, (feat, labels, hw)


# -------------------------------------------------------------------------------- VinVL

def test_vinvl_import_stores_the_rows_and_records_every_problem(tmp_path):
    images, keys, (feat, labels, hw) = _troubled_vinvl(tmp_path)
    out = tmp_path / "set"
    imp("--features", feat, "--labels", labels, "--hw", hw, "--out", out, "--num-shards", 2,
        "--shard-index", "all", "--feature-dtype", "float32", "--commit-every", 2,
        "--max-failures", 5, *QUIET)
    assert errors(out) == []
    m = read_manifest(out)
    assert m["role"] == "proposals" and m["detector"]["kind"] == "imported"
    assert m["detector"]["name"] == "tsv:vinvl" and m["preprocessing"] is None
    assert m["options"]["geometry"] == 6 and m["options"]["tsv_feature_dim"] == D + 6
    # the names of label.tsv (whose row of keys[4] was cut to its first 2 objects)
    names = sorted({n for k, v in images.items()
                    for n in (v["names"][:2] if k == keys[4] else v["names"])})
    assert m["class_names"] == names + [FILL_CLASS_NAME]
    # every non-blank row is an image of the sorted list; rows that cannot be stored under
    # their key have a stand-in id, and every unusable row is a failure
    ids = sorted(keys + ["<row 7>", "<row 9>"])
    assert m["image_source"]["num_images"] == len(ids) == 9
    failures = {f["image_id"]: f["reason"] for f in m["failures"]}
    assert sorted(failures) == sorted([keys[3], "<row 7>", "<row 9>"])
    assert failures[keys[3]].startswith(f"bad-row: test.feature.tsv row 3 ({keys[3]!r}): ")
    assert failures["<row 7>"].startswith("duplicate: test.feature.tsv row 7 repeats the "
                                          f"image id {keys[0]!r} of row 0")
    assert "not UTF-8" in failures["<row 9>"]
    rs = RegionSet(out)
    assert len(rs) == 6 and rs.feature_dtype == np.float32
    for key in (keys[0], keys[2], keys[5], keys[6]):
        r, img = rs.get(key), images[key]
        assert r.image_hw == img["hw"] and np.array_equal(r.features, img["features"])
        assert np.array_equal(r.boxes, img["boxes"]) and np.array_equal(r.scores, img["scores"])
        assert [rs.class_names[c] for c in r.classes] == img["names"]
        assert r.image_digest == b"\0" * 16
    empty = rs.get(keys[1])
    assert empty.num_regions == 0 and empty.image_hw == images[keys[1]]["hw"]
    # a label row with another box count is never misaligned: boxes from the geometry columns
    # and the image size, no classes (the fill) and no scores (0), and a warning by row
    r = rs.get(keys[4])
    np.testing.assert_allclose(r.boxes, images[keys[4]]["boxes"], atol=1e-3)
    assert (r.classes == m["class_names"].index("")).all() and (r.scores == 0).all()
    assert np.array_equal(r.features, images[keys[4]]["features"])
    warned = [w for i in range(2) for w in warnings_of(out, i, 2)]
    assert warned == [{"image_id": keys[4], "notes": [
        "test.label.tsv row 4 has 2 objects but test.feature.tsv row 4 has 5 regions: the "
        "label row is not used for the regions"]}]
    assert not list((out / WARNINGS_DIR).glob("*.partial"))
    # teacher-features accepts it as --proposals: its input check passes on every shard
    for i in range(2):
        verify_proposals_shard(out, m, i)


def test_float16_files_labelmap_and_names_outside_it(tmp_path):
    images = _images(seed=4, counts=(2, 3))
    feat, labels, hw = _vinvl_files(tmp_path, images, dtype=np.float16)
    used = sorted({n for v in images.values() for n in v["names"]})
    vocab = ["zebra"] + used[1:]                       # used[0] is not in the labelmap
    lm = tmp_path / "VG-SGG-dicts-vgoi6-clipped.json"  # VinVL's layout: ids from 1
    lm.write_text(json.dumps({"label_to_idx": {n: i + 1 for i, n in enumerate(vocab)},
                              "attribute_to_idx": {"red": 1, "big": 2}}))
    assert read_vocabulary(lm) == (vocab, ["red", "big"])
    out = tmp_path / "set"
    imp("--features", feat, "--labels", labels, "--hw", hw, "--labelmap", lm, "--out", out,
        "--shard-index", "all", *QUIET)
    m = read_manifest(out)
    assert m["class_names"] == vocab + [""] and m["options"]["tsv_dtype"] == "float16"
    rs = RegionSet(out)
    assert rs.feature_dtype == np.float16
    for key, img in images.items():
        r = rs.get(key)
        assert np.array_equal(r.features, img["features"].astype(np.float16))
        want = [vocab.index(n) if n in vocab else len(vocab) for n in img["names"]]
        assert r.classes.tolist() == want
    notes = [n for w in warnings_of(out) for n in w["notes"]]
    assert any(f"class name(s) not in the vocabulary ('{used[0]}')" in n for n in notes)


def test_vocabulary_files(tmp_path):
    txt = tmp_path / "objects_vocab.txt"    # bottom-up-attention: synonyms after commas
    txt.write_text("yolk\nTrash Can,garbage can\nstop sign,stopsign\n")
    assert read_vocabulary(txt) == (["yolk", "trash can", "stop sign"], None)
    lst = tmp_path / "class_names.json"
    lst.write_text(json.dumps(["a", "b"]))
    assert read_vocabulary(lst) == (["a", "b"], None)
    idx = tmp_path / "labelmap.json"
    idx.write_text(json.dumps({"idx_to_label": {"2": "b", "1": "a"}}))
    assert read_vocabulary(idx) == (["a", "b"], None)
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"label_to_idx": {"a": 1, "b": 3}}))
    with pytest.raises(ImportTsvError, match="not contiguous"):
        read_vocabulary(gap)


# ------------------------------------------------------------------------- SGB, BUTD

def test_sgb_predictions_with_attributes(tmp_path):
    images = _images(seed=11, counts=(3, 2, 1))
    attrs = [["white", "big", "old"], [], ["red"]]
    rows = []
    for j, (key, img) in enumerate(images.items()):
        objects = []
        for i in range(len(img["boxes"])):
            a = attrs[i % 3]
            objects.append({"rect": img["boxes"][i].tolist(), "bbox_id": i,
                            "class": img["names"][i], "conf": float(img["scores"][i]),
                            "feature": base64.b64encode(img["features"][i]).decode(),
                            "attributes": a, "attr_scores": [0.25, 0.75, 0.5][:len(a)]})
            if j == 2:
                del objects[-1]["feature"]
        rows.append((key, json.dumps({"objects": objects, "relations": None})))
    pred = _sgb_tsv_writer(tmp_path / "predictions.tsv", rows)
    hw = _sgb_tsv_writer(tmp_path / "test.hw.tsv", [
        (k, json.dumps([{"height": v["hw"][0], "width": v["hw"][1]}]))
        for k, v in images.items()])
    out = tmp_path / "set"
    imp("--format", "sgb", "--features", pred, "--hw", hw, "--attributes", 2, "--out", out,
        "--shard-index", "all", "--feature-dtype", "float32", "--max-failures", 1, *QUIET)
    assert errors(out) == []
    m = read_manifest(out)
    assert m["attribute_names"] == ["big", "old", "red", "white"]
    assert m["extras"] == {"attr_ids": ["int32", 2], "attr_scores": ["float32", 2]}
    k0, k1, k2 = images
    r = RegionSet(out).get(k0)
    assert np.array_equal(r.features, images[k0]["features"])
    assert np.array_equal(r.boxes, images[k0]["boxes"])
    # best first, at most 2: white 0.25, big 0.75, old 0.5 -> big, old; none -> -1 / 0
    assert r.extras["attr_ids"].tolist() == [[0, 1], [-1, -1], [2, -1]]
    assert r.extras["attr_scores"].tolist() == [[0.75, 0.5], [0, 0], [0.25, 0]]
    (fail,) = m["failures"]
    assert fail["image_id"] == k2 and "object 0 has no 'feature'" in fail["reason"]


@pytest.mark.parametrize("fields", ["butd", "lxmert"])
def test_butd_and_lxmert_import(tmp_path, fields):
    images = {str(100 + i): v for i, v in
              enumerate(_images(seed=7, counts=(3, 1, 5, 2)).values())}
    names = BUTD_FIELDS if fields == "butd" else LXMERT_FIELDS
    path = _csv_dictwriter_file(tmp_path / "trainval.tsv",
                                _butd_items(images, lxmert=fields == "lxmert"), names)
    out = tmp_path / "set"
    extra = []
    if fields == "lxmert":      # LXMERT's ids index BUTD's 1600/400 VG vocabularies
        (tmp_path / "objects_vocab.txt").write_text("".join(f"o{i}\n" for i in range(6)))
        (tmp_path / "attributes_vocab.txt").write_text("".join(f"a{i}\n" for i in range(10)))
        extra = ["--labelmap", tmp_path / "objects_vocab.txt", "--attribute-names",
                 tmp_path / "attributes_vocab.txt", "--attributes", 1]
    imp("--format", "butd", "--features", path, "--out", out, "--shard-index", "all",
        "--feature-dtype", "float32", *extra, *QUIET)
    assert errors(out) == []
    m, rs = read_manifest(out), RegionSet(out)
    for key, img in images.items():
        r = rs.get(key)
        n = len(img["boxes"])
        assert r.image_hw == img["hw"] and np.array_equal(r.boxes, img["boxes"])
        assert np.array_equal(r.features, img["features"])
        if fields == "butd":      # no classes, no scores in BUTD rows: the fill
            assert m["class_names"] == [""] and (r.classes == 0).all() and (r.scores == 0).all()
        else:
            ids = np.arange(n)
            want = np.where(ids < 6, ids, 6)   # ids outside the vocabulary -> the fill (6)
            assert r.classes.tolist() == want.tolist()
            assert np.array_equal(r.scores, img["scores"])
            a = ids + 7
            assert r.extras["attr_ids"][:, 0].tolist() == np.where(a < 10, a, -1).tolist()


# ---------------------------------------------------------------------- resume, signals

def _big_vinvl(tmp_path, n=160, dim=512):
    """Rows large enough that an import with 2-row windows takes a while."""
    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        k = int(rng.integers(1, 6))
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        x1, y1 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, k), y1 + rng.uniform(1, h / 2, k)],
                         1).astype(np.float32)
        images[f"img{i:04d}"] = dict(hw=(h, w), boxes=boxes, scores=rng.random(k, np.float32),
                                     names=[f"c{int(c)}" for c in rng.integers(0, 9, k)],
                                     features=rng.random((k, dim), np.float32))
    keys = list(images)
    order = [keys[i] for i in rng.permutation(n)]      # the file is not sorted by key
    feats = [_vinvl_feature_line(k, _full(images[k])) for k in order]
    feats[5] = feats[5][:-7]                              # one bad row
    return (_write_lines(tmp_path / "f.feature.tsv", feats),
            _write_lines(tmp_path / "f.label.tsv", [_label_line(k, images[k]) for k in order]),
            _write_lines(tmp_path / "f.hw.tsv", [_hw_line(k, images[k]) for k in order]))


def _argv(files, out, *extra):
    feat, labels, hw = files
    return ["import-tsv", "--features", str(feat), "--labels", str(labels), "--hw", str(hw),
            "--out", str(out), "--num-shards", "2", "--shard-index", "all", "--commit-every",
            "2", "--no-progress", *extra]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_then_rerun_gives_the_same_set(tmp_path, workers):
    files = _big_vinvl(tmp_path)
    ref = tmp_path / "ref"
    invoke_extract(_argv(files, ref, "--num-workers", "0"))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "vlkd.extract.cli", *_argv(files, out, "--num-workers",
                                                              workers)]
    commit = out / "shard-00000-of-00002.h5.partial" / "commit.json"
    # the import commits every ~3 ms on a quiet machine: a short delay keeps the kill mid-shard
    rc, err, seed = sigkill_after_first_commit(argv, commit, 0.02)
    assert rc == -signal.SIGKILL, (seed, err)
    assert not (out / "shard-00001-of-00002.h5").exists()
    res = invoke_extract([*_argv(files, out, "--num-workers", workers), "--log-format", "json"])
    events = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and 0 < resumed[0]["committed"] < 80, (seed, events)
    assert errors(out) == []
    assert_same_shards(ref, out, f"seed={seed}")
    assert read_manifest(ref)["failures"] == read_manifest(out)["failures"]
    for i in range(2):
        assert warnings_of(ref, i, 2) == warnings_of(out, i, 2)
    # the workers of the killed job did not outlive it
    if workers != "0":
        import subprocess
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(out) not in ps


def test_sigterm_stops_at_a_window_boundary_and_the_rerun_resumes(tmp_path):
    files = _big_vinvl(tmp_path)
    ref = tmp_path / "ref"
    invoke_extract(_argv(files, ref, "--num-workers", "0"))
    out = tmp_path / "stopped"
    commit = out / "shard-00000-of-00002.h5.partial" / "commit.json"
    rc, took, err = signal_mid_job(_argv(files, out, "--num-workers", "2"), commit,
                                   signal.SIGTERM, max_delay=0.2, seed=3)
    assert rc in (143, 0), (rc, err)
    if rc:
        assert "stopped by SIGTERM" in err and "run the same command" in err, err
        assert "Traceback" not in err, err
        assert not list(out.glob("shard-*.lock"))
    assert took < 30, took
    invoke_extract(_argv(files, out, "--num-workers", "2"))
    assert errors(out) == []
    assert_same_shards(ref, out)


# ------------------------------------------------------------------------ refusals, cli

def test_refusals(tmp_path):
    images = _images(seed=5, counts=(2, 3, 1))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    out = tmp_path / "set"
    base = ["--features", feat, "--labels", labels, "--hw", hw, "--out", out, "--shard-index",
            "all", *QUIET]
    imp(*base, "--num-shards", 2)
    r = imp(*base, "--num-shards", 3, expect=1)
    assert "another --num-shards" in r.output and "write to a new --out" in r.output
    r = imp(*base, "--num-shards", 2, "--feature-dtype", "float32", expect=1)
    assert "another --feature-dtype" in r.output
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps(sorted({n for v in images.values() for n in v["names"]})))
    r = imp(*base, "--num-shards", 2, "--labelmap", lm, expect=1)
    assert "made without --labelmap (None in its manifest.json" in r.output
    k = list(images)[0]
    other = _write_lines(tmp_path / "o.tsv", [_vinvl_feature_line(k, _full(images[k]))])
    r = imp(*base[:1], other, *base[2:], "--num-shards", 2, expect=1)
    assert "from another --features file" in r.output
    # the same files under another path: the same set (paths are recorded, not compared)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in (feat, labels, hw):
        (copy / p.name).write_bytes(p.read_bytes())
    imp("--features", copy / feat.name, "--labels", copy / labels.name, "--hw",
        copy / hw.name, *base[6:], "--num-shards", 2)
    # not a feature file; a butd file as vinvl; options of another format
    junk = _write_lines(tmp_path / "junk.tsv", ["a\tb", "c\td"])
    r = imp("--features", junk, "--out", tmp_path / "j", "--shard-index", "all", *QUIET,
            expect=1)
    assert "pass feature_dim= and dtype=" in r.output
    r = imp("--format", "butd", "--features", feat, "--labels", labels, "--out",
            tmp_path / "b", *QUIET, expect=2)
    assert "--labels is a file of --format vinvl" in r.output
    r = imp("--features", feat, "--out", tmp_path / "n", *QUIET, expect=1)
    assert "no shard index" in r.output


def test_without_an_image_size_rows_are_failures(tmp_path):
    images = _images(seed=6, counts=(2, 3))
    feat, _, _ = _vinvl_files(tmp_path, images)
    out = tmp_path / "set"
    r = imp("--features", feat, "--out", out, "--shard-index", "all", "--max-failures", 1,
            *QUIET, expect=3)
    assert "2 of 2 rows failed, more than --max-failures 1 allows" in r.output
    m = read_manifest(out)
    assert len(m["shards"]) == 1 and all("no image size (pass hw.tsv)" in f["reason"]
                                          for f in m["failures"])


def options_of(command: str, schema) -> set[str]:
    """The keys ``vlkd-extract COMMAND``'s options set; each is generated from the schema
    (no default of its own, the field's default and help shown), as test_extract_config
    checks for the detector jobs."""
    keys = set()
    for p in main.commands[command].params:
        if p.name in ("job_config", "overrides") or p.param_type_name == "argument":
            continue
        assert p.name.startswith("cfg__"), p.opts
        key = p.name[len("cfg__"):].replace("__", ".")
        assert p.default is None and not p.required
        text = " ".join(p.help.split())
        shown = field_default(schema, key)
        assert f"[{key}; default: " in text, text
        if shown not in (None, "", [], True, False):
            assert f"default: {shown}]" in text, (key, text)
        keys.add(key)
    return keys


def test_every_option_is_generated_and_the_options_are_saved(tmp_path):
    keys = options_of("import-tsv", ImportTsvConfig)
    assert {"features", "labels", "hw", "out", "labelmap", "attributes", "num_workers"} <= keys
    images = _images(seed=8, counts=(2, 2))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"features": str(feat), "labels": str(labels), "hw": str(hw),
                                   "num_shards": 2, "shard_index": "all"}))
    out = tmp_path / "set"
    imp("--job-config", job, "--out", out, "--set", "window=1", *QUIET)
    saved = yaml.safe_load((out / SET_CONFIG_FILE).read_text())
    assert not set(PER_JOB_KEYS) & set(saved) and saved["window"] == 1
    assert load(ImportTsvConfig, out / SET_CONFIG_FILE).num_shards == 2
    r = imp("--job-config", job, "--out", out, "--set", "atributes=3", *QUIET, expect=2)
    assert "unknown key 'atributes'" in r.output


def test_python_api_and_progress_events(tmp_path):
    import io
    images = _images(seed=9, counts=(1, 2, 3))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    stream = io.StringIO()
    res = run_import_tsv(ImportTsvConfig(features=str(feat), labels=str(labels), hw=str(hw),
                                         out=str(tmp_path / "set"), shard_index="all",
                                         num_workers=0),
                         Progress("json", stream=stream))
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [e["event"] for e in events if e["event"] != "progress"] == [
        "start", "shard_done", "summary"]
    assert events[0]["line_index"] == "read test.feature.lineidx"
    assert res.num_images == 3 and res.num_failures == 0 and not res.failures_exceeded


def test_launch_runs_import_shards_as_local_processes(tmp_path):
    """vlkd-extract launch takes import-tsv too (no model: no --device passed). Each shard
    process judges its own failures against --max-failures, as an array task does (the
    fixture's one bad row is over 1 % of a shard), so the limit is a count here."""
    files = _big_vinvl(tmp_path)
    ref = tmp_path / "ref"
    invoke_extract(_argv(files, ref, "--num-workers", "0", "--max-failures", "5"))
    out = tmp_path / "launched"
    argv = [a for a in _argv(files, out, "--num-workers", "0", "--max-failures", "5")
            if a not in ("--shard-index", "all")]
    res = invoke_extract(["launch", "--workers", "2", "--", *argv])
    assert "launch: 2 shard(s) done, 0 failed" in res.output, res.output
    assert_same_shards(ref, out)
