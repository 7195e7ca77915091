"""DeCap (Li et al., ICLR 2023) on any CLIP-like encoder: a text-trained decoder and memory projection."""
from .model import DeCap, DeCapConfig, memory_weights, project_to_memory
from .train import train_decap

__all__ = ["DeCap", "DeCapConfig", "memory_weights", "project_to_memory", "train_decap"]
