"""BERT WordPiece tokenizer: loaded from a directory (Hugging Face format), or trained from
annotation files with the ``tokenizers`` library for data that comes without one
(``vlkd-train build-vocab``).

Teacher and student must read the same token ids, so a run stores the tokenizer it used in its
model directories and ``distill`` checks that teacher and student vocabularies agree.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

__all__ = ["load_tokenizer", "build_vocab", "annotation_texts", "vocab_digest",
           "TokenizerError", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerError(ValueError):
    """A tokenizer directory or annotation file is not usable."""


def load_tokenizer(directory: str | Path) -> BertTokenizerFast:
    """Loads a BERT WordPiece tokenizer from a directory holding ``vocab.txt`` (and optionally
    ``tokenizer.json`` / ``tokenizer_config.json``).

    Args:
        directory: A Hugging Face BERT/MiniLM model directory, a run's model directory, or the
            output of :func:`build_vocab`.

    Returns:
        The fast tokenizer (lower-casing as configured in the directory; uncased by default).
    """
    directory = Path(directory)
    if not (directory / "vocab.txt").is_file() and not (directory / "tokenizer.json").is_file():
        raise TokenizerError(
            f"no tokenizer in {directory}: expected a BERT WordPiece vocab.txt (or tokenizer.json);"
            f" point data.tokenizer at a BERT/MiniLM model directory or build one with "
            f"`vlkd-train build-vocab --out {directory} ANNOTATIONS...`")
    tok = BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise TokenizerError(f"tokenizer in {directory} lacks the BERT special tokens {missing}; "
                             "vlkd's sequences need [CLS] [SEP] [MASK] [PAD] [UNK]")
    return tok


def vocab_digest(tokenizer: BertTokenizerFast) -> str:
    """Hex digest of the token → id map (two tokenizers with the same digest give the same ids
    for the same text, given the same normalisation settings, which are part of the digest)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    norm = getattr(tokenizer, "do_lower_case", True)
    payload = json.dumps({"vocab": vocab, "lower": norm}, separators=(",", ":"))
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def annotation_texts(path: str | Path) -> Iterable[str]:
    """The texts of an annotation file: captions (Karpathy or COCO), VQA questions and answers
    (questions or annotations file), pre-training pairs (TSV/JSON), or a plain text file (one
    text per line)."""
    from vlkd.data.captions import AnnotationError, _load_json, load_captions, load_pairs

    path = Path(path)
    if path.suffix in (".tsv",):
        return [c.text for c in load_pairs(path)]
    if path.suffix in (".txt",):
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    data = _load_json(path)
    if isinstance(data, dict) and "questions" in data:
        return [q["question"] for q in data["questions"]]
    if isinstance(data, dict) and "annotations" in data and data["annotations"] \
            and "answers" in data["annotations"][0]:
        return [a["answer"] for ann in data["annotations"] for a in ann["answers"]]
    if isinstance(data, list):
        return [c.text for c in load_pairs(path)]
    try:
        return [c.text for c in load_captions(path)]
    except AnnotationError as e:
        raise TokenizerError(f"{path}: not an annotation file build-vocab reads ({e})") from None


def build_vocab(files: list[str | Path], out_dir: str | Path, *, vocab_size: int = 30522,
                min_frequency: int = 2, extra_words: Iterable[str] = (),
                lowercase: bool = True) -> BertTokenizerFast:
    """Trains a BERT WordPiece vocabulary on annotation texts and saves it as a Hugging Face
    tokenizer directory (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``).

    Args:
        files: Annotation files (see :func:`annotation_texts`).
        out_dir: Output directory.
        vocab_size: Upper bound of the vocabulary size (specials included).
        min_frequency: Minimum count of a merged piece.
        extra_words: Texts that must be tokenisable, e.g. a region set's class names (the
            object tags): they are added to the training texts ten times each so that their
            words become whole tokens.
        lowercase: Uncased vocabulary (as bert-base-uncased and MiniLM).

    Returns:
        The trained tokenizer, loaded back from ``out_dir``.
    """
    from tokenizers import BertWordPieceTokenizer

    texts: list[str] = []
    for f in files:
        texts.extend(annotation_texts(f))
    extra = [w for w in extra_words if w]
    texts.extend(extra * 10)
    if not texts:
        raise TokenizerError(f"no texts found in {[str(f) for f in files]}; pass caption, VQA or "
                             "pair annotation files")
    wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True,
                                strip_accents=None, lowercase=lowercase)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                           special_tokens=SPECIAL_TOKENS, limit_alphabet=1000,
                           wordpieces_prefix="##", show_progress=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(out_dir))  # vocab.txt
    for stale in ("tokenizer.json",):  # a previous build's fast file would shadow vocab.txt
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}, indent=2) + "\n")
    # Loading from vocab.txt works across transformers 4.x and 5.x (their constructors differ);
    # save_pretrained then adds the fast tokenizer.json.
    tok = BertTokenizerFast.from_pretrained(str(out_dir), local_files_only=True)
    tok.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)
