"""Captioning metrics plumbing (pycocoevalcap)."""
from __future__ import annotations


def test_tokenizer_copy_for_a_read_only_package_tokenizes_as_pycocoevalcap(tmp_path, monkeypatch):
    """In a read-only image pycocoevalcap's tokenizer cannot write its temp file next to its
    jar; the copy run from a writable folder gives the same tokens."""
    from pathlib import Path

    from pycocoevalcap.tokenizer import ptbtokenizer

    from vlkd.train.metrics import _CopiedPTBTokenizer

    caps = {"1": [{"caption": "A man, riding a horse!"}, {"caption": "Two dogs... playing"}],
            "2": [{"caption": "It's a \"red\" car; (parked)"}]}
    want = ptbtokenizer.PTBTokenizer().tokenize(caps)
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path))
    got = _CopiedPTBTokenizer(Path(ptbtokenizer.__file__).parent).tokenize(caps)
    assert got == want
    assert want["1"][0] == "a man riding a horse"
    assert (tmp_path / "vlkd-ptb-tokenizer" / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR).is_file()
