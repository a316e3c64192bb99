"""Captioning metrics from pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE).

The VQA accuracy (the official VQA v2 metric) lives next to the answer normalisation it depends
on, in :mod:`vlkd.data.vqa`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def spice_available() -> tuple[bool, str]:
    """SPICE needs Java and Stanford CoreNLP 3.6.0 jars beside pycocoevalcap's spice jar, which
    pycocoevalcap otherwise downloads at run time (impossible offline)."""
    from pycocoevalcap.spice import spice as spice_mod

    lib = Path(spice_mod.__file__).parent / "lib"
    jar = lib / "stanford-corenlp-3.6.0.jar"
    if shutil.which("java") is None:
        return False, "SPICE skipped: java is not on PATH"
    if not jar.exists():
        return False, (f"SPICE skipped: Stanford CoreNLP models are missing ({jar}); run "
                       "pycocoevalcap.spice.get_stanford_models on a machine with network "
                       "access (or copy the two stanford-corenlp-3.6.0*.jar files there)")
    return True, ""


def _ptb_tokenizer():
    """pycocoevalcap's PTB tokenizer, or, when its folder is read-only, the same tokenization
    run from a writable copy of its jar.

    ``PTBTokenizer.tokenize`` writes its input to a temporary file *next to its jar* (inside
    site-packages), which fails in a read-only image (Apptainer/Singularity, ``docker run
    --read-only``) or a root-owned venv used by another user.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    here = Path(ptbtokenizer.__file__).resolve().parent
    if os.access(here, os.W_OK):
        return ptbtokenizer.PTBTokenizer()
    return _CopiedPTBTokenizer(here)


class _CopiedPTBTokenizer:
    """``PTBTokenizer.tokenize`` from a writable folder holding a copy of its jar.

    The command line, the one-caption-per-line input and the punctuation removed are those of
    pycocoevalcap/tokenizer/ptbtokenizer.py (``java -cp stanford-corenlp-3.4.1.jar
    edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase FILE``, its
    ``PUNCTUATIONS``); only the folder differs.
    """

    def __init__(self, source: Path):
        from pycocoevalcap.tokenizer import ptbtokenizer

        self.jar = ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
        self.punctuations = set(ptbtokenizer.PUNCTUATIONS)
        root = Path(os.environ.get("VLKD_CACHE") or tempfile.gettempdir()) / "vlkd-ptb-tokenizer"
        root.mkdir(parents=True, exist_ok=True)
        if not (root / self.jar).is_file():
            tmp = root / f".{self.jar}.{os.getpid()}"
            shutil.copyfile(source / self.jar, tmp)
            os.replace(tmp, root / self.jar)
        self.dir = root

    def tokenize(self, captions_for_image: dict) -> dict:
        ids = [k for k, v in captions_for_image.items() for _ in range(len(v))]
        sentences = "\n".join(c["caption"].replace("\n", " ")
                              for v in captions_for_image.values() for c in v)
        with tempfile.NamedTemporaryFile(dir=self.dir, delete=False) as f:
            f.write(sentences.encode())
        try:
            out = subprocess.run(["java", "-cp", self.jar, "edu.stanford.nlp.process.PTBTokenizer",
                                  "-preserveLines", "-lowerCase", os.path.basename(f.name)],
                                 cwd=self.dir, stdout=subprocess.PIPE, check=True).stdout
        finally:
            os.unlink(f.name)
        result: dict = {}
        for k, line in zip(ids, out.decode().split("\n")):
            result.setdefault(k, []).append(
                " ".join(w for w in line.rstrip().split(" ") if w not in self.punctuations))
        return result


def caption_scores(references: dict[str, list[str]], predictions: dict[str, str],
                   *, spice: bool | None = None) -> dict:
    """Score captions with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE).

    Both sides go through pycocoevalcap's PTB tokenizer (Java), exactly as ``COCOEvalCap`` does.

    Args:
        references: image id -> reference captions.
        predictions: image id -> one predicted caption; every id must have references.
        spice: True to require SPICE, False to skip it, None to run it when available.
    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"], "notes": [...]}``
        with scores as pycocoevalcap returns them (fractions; CIDEr ×100 is the usual print).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    extra = sorted(set(predictions) - set(references))
    if extra:
        raise ValueError(f"{len(extra)} predicted images have no reference captions (e.g. "
                         f"{extra[:3]}); evaluate against the annotation file of the same split")
    if not predictions:
        raise ValueError("no predictions to score")
    ids = sorted(predictions)
    gts = {i: [{"caption": c} for c in references[i]] for i in ids}
    res = {i: [{"caption": predictions[i]}] for i in ids}
    if shutil.which("java") is None:
        raise RuntimeError("captioning metrics need Java (pycocoevalcap's tokenizer and METEOR "
                           "run on the JVM); install a JRE, e.g. apt-get install default-jre")
    tok = _ptb_tokenizer()
    with contextlib.redirect_stdout(io.StringIO()):
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    out: dict = {"notes": []}
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"),
               (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    ok, why = spice_available()
    if spice is True and not ok:
        raise RuntimeError(why)
    if spice is not False and ok:
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice(), "SPICE"))
    elif spice is not False:
        out["notes"].append(why)
        log.warning(why)
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = scorer.compute_score(gts_t, res_t)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
        else:
            out[names] = float(score)
        # METEOR keeps a JVM subprocess; end it now so evaluation leaves nothing running.
        proc = getattr(scorer, "meteor_p", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
                proc.kill()
                proc.wait()
    return out


__all__ = ["caption_scores", "spice_available"]
