"""e2-adapter: E2 (Easy Regional Contrastive Learning of Expressive Fashion Representations, NeurIPS
2024) as a plug-in adapter that turns any CLIP ViT into a fashion expert with a few extra parameters.

    model = e2_adapter.wrap(clip_model)                 # in place; encode_image keeps working
    out = e2_adapter.encode_image_regions(model, x)     # global + per-entity embeddings + selections
"""
from .backends import UnsupportedModelError
from .config import DEFAULT_ENTITIES, PRESETS, E2Config
from .interpolate import interpolate_weights
from .io import AdapterMismatchError, load_adapter, save_adapter
from .loading import load_encoder
from .pretrained import from_pretrained, save_pretrained
from .product import CatalogueIndex, build_index, classify, tag
from .tower import E2Output
from .wrap import (NotWrappedError, count_parameters, encode_image_regions, get_adapter, get_backend, is_wrapped,
                   mark_only_adapter_trainable, print_trainable_parameters, unwrap, wrap)

__version__ = "0.1.0"

__all__ = [
    "wrap", "unwrap", "is_wrapped", "E2Config", "E2Output", "encode_image_regions", "save_adapter", "load_adapter",
    "mark_only_adapter_trainable", "print_trainable_parameters", "count_parameters", "get_adapter", "get_backend",
    "save_pretrained", "from_pretrained", "load_encoder", "interpolate_weights", "classify", "tag", "build_index", "CatalogueIndex", "DEFAULT_ENTITIES", "PRESETS", "UnsupportedModelError", "AdapterMismatchError", "NotWrappedError",
]
