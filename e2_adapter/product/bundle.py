"""The (model, tokenizer, preprocess) a product function needs, from a ClipBundle or the three parts."""
from __future__ import annotations

from ..zoo import ClipBundle


def parts(model, tokenizer=None, preprocess=None):
    """``model`` may be a ClipBundle (its tokenizer and preprocess are used unless given)."""
    if isinstance(model, ClipBundle):
        return model.model, tokenizer or model.tokenizer, preprocess or model.preprocess
    if tokenizer is None:
        raise ValueError("pass a ClipBundle (e.g. from e2_adapter.from_pretrained) or give tokenizer=")
    return model, tokenizer, preprocess
