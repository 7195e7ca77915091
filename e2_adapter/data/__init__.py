"""Product data: one catalogue interface, its readers, and torch datasets over it."""

from .amazon import AmazonFashion, read_amazon_metadata, read_amazon_split
from .catalogue import Box, DataFormatError, ProductCatalogue
from .datasets import CLIP_MEAN, CLIP_STD, EvalImages, TrainViews, collate, default_transform
from .fashiongen import (DEFAULT_TEXT_TEMPLATE, FASHIONGEN_ENTITIES, FASHIONGEN_KEYS,
                         FashionGenH5)
from .manifest import ManifestCatalogue
from .mixed import MixedCaptions
from .synth import (SYNTH_ENTITIES, TRAIN_FILE, VALIDATION_FILE, SynthSpec, SynthWorld, add_synth_flags,
                    make_world, synth_spec_from_args, write_fashionsynth)

__all__ = [
    "ProductCatalogue", "DataFormatError", "Box",
    "FashionGenH5", "FASHIONGEN_KEYS", "FASHIONGEN_ENTITIES", "DEFAULT_TEXT_TEMPLATE",
    "write_fashionsynth", "make_world", "SynthWorld", "SynthSpec", "add_synth_flags", "synth_spec_from_args", "SYNTH_ENTITIES", "TRAIN_FILE",
    "VALIDATION_FILE",
    "AmazonFashion", "read_amazon_metadata", "read_amazon_split",
    "ManifestCatalogue", "MixedCaptions",
    "TrainViews", "EvalImages", "collate", "default_transform", "CLIP_MEAN", "CLIP_STD",
]
