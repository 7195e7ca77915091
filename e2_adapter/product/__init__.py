"""What to do with a trained model: classify, tag, index and search a catalogue."""
from .classify import Prediction, classify
from .index import CatalogueIndex, Hit, build_index
from .tag import tag, tagging_accuracy, write_tags
from .vocab import CLASSIFY_TEMPLATES, read_vocabulary, vocabulary_from_catalogue

__all__ = ["CatalogueIndex", "Hit", "build_index", "Prediction", "classify", "tag", "tagging_accuracy", "write_tags", "vocabulary_from_catalogue",
           "read_vocabulary", "CLASSIFY_TEMPLATES"]
