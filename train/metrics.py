"""Captioning metrics from pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE).

The VQA accuracy (the official VQA v2 metric) lives next to the answer normalisation it depends
on, in :mod:`vlkd.data.vqa`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
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
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

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
    tok = PTBTokenizer()
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
