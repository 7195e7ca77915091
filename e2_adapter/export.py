"""ONNX export of a model's image encoder (E2's global + region embeddings + selections) and text encoder.

    export_onnx(bundle_or_model, "runs/onnx")     # image_encoder.onnx, text_encoder.onnx, export.json

Both graphs take a dynamic batch. The image graph's outputs are ``image`` [B, D] and, for an E2 model,
``regions`` [B, entities, D] (in ``export.json``'s entity order) and ``selections`` [B, fusion blocks,
tokens] (the patch each token picked, argmax as in evaluation); embeddings are not normalised, as
from ``encode_image``. The text graph maps [B, context] token ids to ``text`` [B, D] over the full
context (the backends' end-token trimming is exact and skipped while exporting).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write_json
from .torch_utils import model_device
from .wrap import encode_image_regions, get_adapter, get_backend, is_wrapped
from .zoo import ClipBundle, source_of

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
EXPORT_FILE = "export.json"


class ImageEncoder(nn.Module):
    """The image side as one module with tensor outputs (what ONNX needs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.wrapped = is_wrapped(model)
        self.entities = tuple(get_adapter(model).config.entities) if self.wrapped else ()

    def forward(self, pixels: torch.Tensor):
        if not self.wrapped:
            return get_backend(self.model).encode_image(pixels)
        out = encode_image_regions(self.model, pixels)
        regions = torch.stack([out.regions[e] for e in self.entities], dim=1)
        return out.image, regions, out.selections.to(torch.int64)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor):
        return get_backend(self.model).encode_text(tokens)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str]) -> None:
    dynamic = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)


def export_onnx(model, directory: str | os.PathLike, *, image_size: int | None = None,
                context_length: int | None = None, tokenizer=None) -> Path:
    """Write ``image_encoder.onnx``, ``text_encoder.onnx`` and ``export.json`` (shapes, output names,
    entities, the model's source) into ``directory``. ``model``: a ClipBundle or a model."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'e2-adapter[onnx]'") from None
    if isinstance(model, ClipBundle):
        image_size, tokenizer, model = image_size or model.image_size, tokenizer or model.tokenizer, model.model
    if not image_size:
        raise ValueError("export_onnx needs the input image size: pass a ClipBundle or image_size=")
    if tokenizer is None and context_length is None:
        raise ValueError("export_onnx needs the text context length: pass a ClipBundle, tokenizer= or context_length=")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        image = ImageEncoder(model)
        outputs = ["image", "regions", "selections"] if image.wrapped else ["image"]
        pixels = torch.zeros(2, 3, image_size, image_size, device=model_device(model))
        # Traced with autograd on: under no_grad, nn.MultiheadAttention takes a fused fast path
        # (aten::_native_multi_head_attention) that ONNX has no operator for.
        _export(image, pixels, directory / IMAGE_FILE, "pixels", outputs)
        tokens = tokenizer(["a photo", "a red dress"]) if tokenizer is not None else \
            torch.zeros(2, context_length, dtype=torch.long)
        _export(TextEncoder(model), tokens.to(pixels.device), directory / TEXT_FILE, "tokens", ["text"])
    finally:
        model.train(was_training)
    meta = {"image": {"file": IMAGE_FILE, "input": "pixels", "shape": ["batch", 3, image_size, image_size],
                      "outputs": outputs, "entities": list(image.entities)},
            "text": {"file": TEXT_FILE, "input": "tokens", "shape": ["batch", int(tokens.shape[1])],
                     "outputs": ["text"]},
            "source": source_of(model)}
    atomic_write_json(directory / EXPORT_FILE, meta)
    return directory
