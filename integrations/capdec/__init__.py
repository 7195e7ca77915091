"""CapDec (Nukrai et al., 2022) on any CLIP-like encoder: text-only training with noise injection."""
from .model import CapDec, CapDecConfig, MLPMapper, TransformerMapper, inject_noise, small_gpt2_config
from .train import train_capdec

__all__ = ["CapDec", "CapDecConfig", "MLPMapper", "TransformerMapper", "inject_noise", "small_gpt2_config",
           "train_capdec"]
