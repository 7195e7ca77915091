"""Caption metrics: the COCO caption suite (pycocoevalcap) and entity accuracy.

``caption_metrics`` gives BLEU@1-4, METEOR, ROUGE-L and CIDEr as fractions in [0, 1] (papers
print them x100). Tokenisation and METEOR run Java; SPICE is skipped because it needs a Stanford
CoreNLP download. ``entity_accuracy`` asks what E2 is for: does the caption name the product's
brand, sub-category, composition and season?
"""
from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

from .data import ENTITIES

SPICE_NOTE = ("SPICE skipped: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use, "
              "and this project runs offline.")
JAVA_NOTE = "Java not used: captions were tokenised in Python (not PTB) and METEOR was skipped."


def _python_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """A stand-in for the PTB tokenizer when Java is missing: lower-case words, punctuation dropped."""
    return {k: [" ".join(re.findall(r"[\w%]+", c.lower())) for c in v] for k, v in captions.items()}


def _clean(text: str) -> str:
    # METEOR's stdin protocol uses '|||' and newlines as separators.
    return re.sub(r"\s+", " ", text.replace("|||", " ")).strip()


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    use_java: bool | None = None) -> dict:
    """Score one predicted caption per id against that id's references.

    Only ids present in ``predictions`` are scored; each must have references. ``use_java``
    defaults to whether ``java`` is on the PATH.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise KeyError(f"{len(missing)} prediction id(s) have no reference, e.g. {missing[:3]}")
    ids = sorted(predictions)
    res = {k: [_clean(predictions[k])] for k in ids}
    gts = {k: [_clean(r) for r in references[k]] for k in ids}
    use_java = shutil.which("java") is not None if use_java is None else use_java
    notes = [SPICE_NOTE]
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    else:
        gts, res = _python_tokenize(gts), _python_tokenize(res)
        notes.append(JAVA_NOTE)

    scores: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU@{n}"] = float(value)
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor = Meteor()
        try:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.meteor_p.kill()  # do not leave the Java process to the garbage collector
            meteor.meteor_p.wait()
    else:
        scores["METEOR"] = None
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = None
    scores["n"] = len(ids)
    scores["notes"] = notes
    return scores


def _alnum(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def names_entity(caption: str, value: str) -> bool:
    """Case-insensitive substring match of a tag value in a caption.

    Both sides are reduced to letters and digits first, so decoder spacing ("96 % cotton ,",
    "t - shirts") and case do not decide the match; only the words and their order do.
    """
    target = _alnum(value)
    return bool(target) and target in _alnum(caption)


def entity_accuracy(predictions: Mapping[str, str], tags: Mapping[str, Mapping[str, str]],
                    entities: Sequence[str] = ENTITIES) -> dict:
    """Per entity: the fraction of captions that name the product's tag value.

    Products whose tag is empty for an entity are left out of that entity's count. ``mean`` is the
    average over entities that had at least one product.
    """
    result: dict = {}
    for entity in entities:
        hits = total = 0
        for pid, caption in predictions.items():
            value = tags.get(pid, {}).get(entity, "")
            if _alnum(value):
                total += 1
                hits += names_entity(caption, value)
        result[entity] = hits / total if total else None
    known = [v for v in result.values() if v is not None]
    result["mean"] = sum(known) / len(known) if known else None
    result["n"] = len(predictions)
    return result
