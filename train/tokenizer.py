"""BERT WordPiece tokenizer: loaded from a directory (Hugging Face format), or trained from
annotation files with the ``tokenizers`` library for data that comes without one
(``vlkd-train build-vocab``).

Teacher and student must read the same token ids, so a run stores the tokenizer it used in its
model directories and ``distill`` checks that teacher and student vocabularies agree.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

__all__ = ["load_tokenizer", "build_vocab", "annotation_texts", "vocab_digest",
           "TokenizerError", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
log = logging.getLogger("vlkd.train")


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


@functools.lru_cache(maxsize=2)
def _splitter(lowercase: bool):
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    return (BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                           lowercase=lowercase), BertPreTokenizer())


def _words(text: str, lowercase: bool) -> list[str]:
    """BERT's own normalisation and pre-tokenisation (whitespace and punctuation splits)."""
    norm, pre = _splitter(lowercase)
    return [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def word_level_vocab(texts: list[str], vocab_size: int, min_frequency: int,
                     lowercase: bool = True) -> list[str] | None:
    """A deterministic WordPiece vocabulary for small closed vocabularies: the specials, every
    character alone and as ``##`` continuation (so any word over this alphabet tokenises), and
    every word seen ``min_frequency`` times, most frequent first (ties alphabetical). None when
    that does not fit in ``vocab_size``."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in _words(t, lowercase):
            counts[w] = counts.get(w, 0) + 1
    chars = sorted({c for w in counts for c in w})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    have = set(vocab)
    vocab += [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
              if n >= min_frequency and w not in have]
    return vocab if len(vocab) <= vocab_size else None


def build_vocab(files: list[str | Path], out_dir: str | Path, *, vocab_size: int = 30522,
                min_frequency: int = 2, extra_words: Iterable[str] = (),
                lowercase: bool = True) -> BertTokenizerFast:
    """Builds a BERT WordPiece vocabulary from annotation texts and saves it as a Hugging Face
    tokenizer directory (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``).

    When every word seen ``min_frequency`` times fits in ``vocab_size`` (with the specials and
    the alphabet), the vocabulary is those whole words (:func:`word_level_vocab`): the same
    texts always give the same file. Otherwise WordPiece merges are trained with the
    ``tokenizers`` library, whose result can differ between runs on the same texts (count ties
    are broken in hash-map order, huggingface/tokenizers#1794), and a warning says so.

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = word_level_vocab(texts, vocab_size, min_frequency, lowercase)
    if words is not None:
        (out_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    else:
        # The tokenizers trainer breaks count ties in hash-map order, so the same texts can
        # give different vocabularies (huggingface/tokenizers#1794): save the result.
        log.warning("build-vocab: %d distinct words do not fit vocab_size %d; training "
                    "WordPiece merges, which the tokenizers library does not make "
                    "reproducible: keep this tokenizer with the runs that use it",
                    len({w for t in texts for w in _words(t, lowercase)}), vocab_size)
        wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True,
                                    strip_accents=None, lowercase=lowercase)
        wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=SPECIAL_TOKENS, limit_alphabet=1000,
                               wordpieces_prefix="##", show_progress=False)
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
