"""What the captioning integrations share: caption corpora, metrics, the frozen encoder, decoding."""
from .data import ENTITIES, STYLES, CaptionCorpus, format_caption, load_corpus, single_sentence
from .encoders import ClipLike, check_width, embed_corpus_images, embed_images, embed_texts, resolve_encoder
from .gap import load_gap, modality_gap, remove_gap, save_gap
from .metrics import caption_metrics, entity_accuracy, names_entity
from .tokenizers import ClipBPETokenizer, HFTokenizer, TextTokenizer, WordTokenizer, load_tokenizer

__all__ = [
    "ENTITIES", "STYLES", "CaptionCorpus", "format_caption", "load_corpus", "single_sentence",
    "ClipLike", "check_width", "embed_corpus_images", "embed_images", "embed_texts", "resolve_encoder",
    "modality_gap", "remove_gap", "save_gap", "load_gap",
    "caption_metrics", "entity_accuracy", "names_entity",
    "ClipBPETokenizer", "HFTokenizer", "TextTokenizer", "WordTokenizer", "load_tokenizer",
]
