"""Zero-shot composed image retrieval with an E2 (or any CLIP) encoder.

Two methods, one FashionIQ protocol:

* CIReVL-style, training-free: ``CIReVL`` / ``evaluate_cirevl`` (caption -> rewrite -> text search).
* Pic2Word / SEARLE-style, trained on images only: ``PseudoWordMapper``, ``train_mapper`` (Pic2Word's
  loss) or ``train_searle`` (SEARLE's textual inversion + distillation), ``Pic2Word`` /
  ``evaluate_pic2word`` (pseudo-word injected into the text tower).

Data: ``FashionIQ`` reads the FashionIQ layout; ``build_synthetic_cir`` writes a synthetic set in that
layout from FashionSynth / FashionGen, one category per edited attribute.
"""
from .cirevl import CaptionStore, CIReVL, ImageFeatures, encode_texts, evaluate_cirevl, load_captions, model_fingerprint
from .fashioniq import (CATEGORIES, FashionIQ, Triplet, average_report, evaluate, join_captions, markdown_table,
                        ranked_names_recall, recall_at_k, target_ranks)
from .pic2word import (PROMPT_STYLES, MapperConfig, Pic2Word, PseudoWordMapper, embed_folder, embed_product_images,
                       evaluate_pic2word, pic2word_loss, query_modification, train_mapper)
from .rewriter import (ATTRIBUTES, LLM_PROMPT, Edit, LLMRewriter, RuleRewriter, UnusableAnswerError, as_rewriter,
                       modification_as_description, parse_edited_description)
from .searle import PhraseBank, distill_mapper, invert_images, searle_contrastive_loss, train_searle
from .synthetic import build_synthetic_cir, find_pairs, load_edits, read_products, rewriter_for
from .text_injection import (PLACEHOLDER, encode_text, encode_text_with_pseudo_tokens, injected,
                             placeholder_token_id, token_width)

__all__ = [
    "CIReVL", "CaptionStore", "ImageFeatures", "encode_texts", "evaluate_cirevl", "load_captions", "model_fingerprint",
    "FashionIQ", "Triplet", "CATEGORIES", "evaluate", "join_captions", "target_ranks", "recall_at_k",
    "ranked_names_recall", "average_report", "markdown_table",
    "MapperConfig", "PROMPT_STYLES", "query_modification", "PseudoWordMapper", "train_mapper", "pic2word_loss", "Pic2Word", "evaluate_pic2word",
    "embed_product_images", "embed_folder",
    "RuleRewriter", "LLMRewriter", "Edit", "ATTRIBUTES", "as_rewriter", "LLM_PROMPT", "UnusableAnswerError",
    "parse_edited_description", "modification_as_description",
    "PhraseBank", "invert_images", "distill_mapper", "searle_contrastive_loss", "train_searle",
    "build_synthetic_cir", "read_products", "find_pairs", "load_edits", "rewriter_for",
    "PLACEHOLDER", "encode_text", "encode_text_with_pseudo_tokens", "injected", "placeholder_token_id", "token_width",
]


def __getattr__(name: str):
    if name == "embed_catalogue":  # the old name of embed_product_images (pic2word warns)
        from . import pic2word
        return pic2word.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
