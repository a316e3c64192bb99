"""WordPiece vocabulary building (tokenizers library) and loading (transformers)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from train_data import scenes, write_captions, write_sets, write_vqa
from vlkd.train.cli import main
from vlkd.train.tokenizer import (TokenizerError, annotation_texts, build_vocab, load_tokenizer,
                                  vocab_digest)


def test_build_vocab_from_captions_and_vqa(tmp_path):
    sc = scenes(12)
    caps = write_captions(tmp_path / "dataset_coco.json", sc)
    q, a = write_vqa(tmp_path / "q.json", tmp_path / "a.json", sc)
    tok = build_vocab([caps, q, a], tmp_path / "tok", vocab_size=300, min_frequency=1,
                      extra_words=["traffic light"])
    vocab = tok.get_vocab()
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert special in vocab
    # every word of the annotations and the extra words is a whole token (small corpus)
    words = {w for t in annotation_texts(caps) + annotation_texts(q) for w in
             t.lower().replace("?", " ").split()}
    for w in words | {"traffic", "light"}:
        assert w in vocab, w
    assert tok.tokenize("A Red Circle") == ["a", "red", "circle"]  # uncased
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
    # what is saved loads back to the same ids
    again = load_tokenizer(tmp_path / "tok")
    assert vocab_digest(again) == vocab_digest(tok)
    assert again("how many objects are there?")["input_ids"] == \
        tok("how many objects are there?")["input_ids"]
    # the vocab file is plain BERT format: one token per line, id = line number
    lines = (tmp_path / "tok" / "vocab.txt").read_text().splitlines()
    assert {t: i for i, t in enumerate(lines)} == vocab


def test_vocab_size_bounds_the_vocabulary(tmp_path):
    sc = scenes(30)
    caps = write_captions(tmp_path / "c.json", sc)
    tok = build_vocab([caps], tmp_path / "tok", vocab_size=40, min_frequency=1)
    assert len(tok) <= 40


def test_load_tokenizer_explains_a_missing_vocab(tmp_path):
    with pytest.raises(TokenizerError, match="vlkd-train build-vocab"):
        load_tokenizer(tmp_path)


def test_build_vocab_command_adds_class_names(tmp_path):
    sc = scenes(6)
    student, _ = write_sets(tmp_path, sc, num_shards=1, teacher=False)
    from vlkd.common.manifest import update_manifest
    update_manifest(student, lambda m: m.update(class_names=["circle", "fire_hydrant"]))
    caps = write_captions(tmp_path / "c.json", sc)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("1000\tan unusual zebra\n")
    res = CliRunner().invoke(main, ["build-vocab", str(caps), str(pairs), "--out",
                                    str(tmp_path / "tok"), "--min-frequency", "1",
                                    "--regions", str(student)])
    assert res.exit_code == 0, res.output
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.tokenize("fire hydrant zebra") == ["fire", "hydrant", "zebra"]
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["do_lower_case"]


def test_small_vocabularies_are_whole_words_and_the_same_every_time(tmp_path):
    """The tokenizers trainer breaks ties in hash-map order (huggingface/tokenizers#1794); a
    vocabulary that fits is built word by word instead, identically in every process."""
    import subprocess
    import sys

    texts = ["A red circle, a RED square.", "the red square is behind the circle?"]
    p = tmp_path / "pairs.tsv"
    p.write_text("".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    # counts: red 3, a 2, circle 2, square 2, the 2, then behind/is 1 (alphabetical)
    tok = build_vocab([p], tmp_path / "tok", vocab_size=1000, min_frequency=1)
    lines = (tmp_path / "tok" / "vocab.txt").read_text().splitlines()
    chars = sorted(set("aredcirclesquarethebehindis,?."))
    assert lines == (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
                     + ["##" + c for c in chars]
                     + ["red", "circle", "square", "the", "behind", "is"])
    assert tok.tokenize("The red squares") == ["the", "red", "square", "##s"]
    # another process (another hash seed) writes the same bytes
    code = ("import sys; from pathlib import Path; from vlkd.train.tokenizer import build_vocab; "
            "build_vocab([Path(sys.argv[1])], Path(sys.argv[2]), vocab_size=1000, "
            "min_frequency=1)")
    for i in range(2):
        subprocess.run([sys.executable, "-c", code, str(p), str(tmp_path / f"tok{i}")],
                       check=True, env={"PYTHONHASHSEED": str(i + 1), "PATH": ""})
        assert (tmp_path / f"tok{i}" / "vocab.txt").read_text() == "\n".join(lines) + "\n"
    # min_frequency drops rare words; too small a vocab_size falls back to merges
    tok = build_vocab([p], tmp_path / "tok2", vocab_size=1000, min_frequency=2)
    assert "behind" not in tok.get_vocab() and "square" in tok.get_vocab()
    assert build_vocab([p], tmp_path / "tok3", vocab_size=40, min_frequency=1) is not None
