"""Zero-shot classification per attribute from the global image embedding.

    e2_adapter.classify(bundle, images, {"brand": ["Ostra", "Vetrano"], "season": ["FW2017", "SS2018"]})
    -> one {entity: [Prediction(label, score, probability), ...top_k]} per image

Both sides are L2-normalised before the dot product (normalising only one side, a known slip in
fashion-CLIP code, makes the ranking depend on each image's norm); probabilities are the softmax
of the model's own logit scale times the cosine, over that entity's labels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..torch_utils import eval_mode, model_device
from ..training.distributed import gather_shards, shard
from ..wrap import encode_image_regions, get_backend, is_wrapped
from .bundle import parts
from .images import image_sequence, pixel_batches
from .vocab import check_vocabulary, label_embeddings, templates_for


@dataclass
class Prediction:
    label: str
    score: float          # cosine similarity of image and label embeddings
    probability: float    # softmax over the entity's labels at the model's logit scale

    def to_dict(self) -> dict:
        return asdict(self)


def logit_scale(model) -> float:
    scale = get_backend(model).logit_scale
    return float(scale.detach().exp()) if scale is not None else 100.0  # CLIP's trained value when a model has none


def embed_images(model, images, preprocess=None, regions: bool = False, batch_size: int = 64,
                 progress: bool = False, distributed: bool = False):
    """Normalised global embeddings [N, D] and (``regions``) {entity: [N, D]} from the region heads.
    ``distributed``: under torchrun each rank embeds a contiguous block and all get every row back."""
    backend = get_backend(model)
    device = model_device(model)
    if regions and not is_wrapped(model):
        raise ValueError("region embeddings need an E2 model (wrapped, or loaded from a save_pretrained "
                         "folder with an adapter); this model is a plain CLIP")
    images = image_sequence(images)
    mine, counts = shard(len(images), distributed)
    if len(counts) > 1:
        images = images[mine.start:mine.stop]
    glob, reg = [], {}
    with eval_mode(model):
        batches = pixel_batches(images, preprocess, batch_size)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, total=-(-len(images) // batch_size), desc="embedding", unit="batch")
        for pixels in batches:
            pixels = pixels.to(device)
            if regions:
                out = encode_image_regions(model, pixels)
                glob.append(out.image.float())
                for e, v in out.regions.items():
                    reg.setdefault(e, []).append(F.normalize(v.float(), dim=-1).cpu())
            else:
                glob.append(backend.encode_image(pixels).float())
    image = gather_shards(F.normalize(torch.cat(glob), dim=-1).cpu(), counts, device)
    reg = {e: gather_shards(torch.cat(v), counts, device) for e, v in reg.items()}
    return (image, reg) if regions else image


def rank(image_emb: torch.Tensor, label_emb: torch.Tensor, labels: list[str], top_k: int,
         scale: float) -> list[list[Prediction]]:
    """Top-k labels per row of (normalised) ``image_emb`` against (normalised) ``label_emb``."""
    cos = image_emb @ label_emb.T
    prob = (scale * cos).softmax(dim=-1)
    k = min(top_k, len(labels))
    top = prob.topk(k, dim=-1).indices
    return [[Prediction(labels[j], float(cos[i, j]), float(prob[i, j])) for j in top[i].tolist()]
            for i in range(len(image_emb))]


def classify(model, images, vocabulary: dict[str, list[str]], *, tokenizer=None, preprocess=None,
             templates=None, top_k: int = 3, batch_size: int = 64) -> list[dict[str, list[Prediction]]]:
    """Zero-shot labels per entity for each image, from the global embedding.

    ``model``: a ClipBundle (or a model with ``tokenizer=``/``preprocess=``); ``images``: a
    preprocessed [B, 3, H, W] tensor, PIL images or paths; ``templates``: None (per-entity
    defaults), one list of prompts for all entities, or ``{entity: [prompt, ...]}``, each with ``{}``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model, tokenizer, preprocess = parts(model, tokenizer, preprocess)
    vocabulary = check_vocabulary(vocabulary)
    image = embed_images(model, images, preprocess, batch_size=batch_size)
    return _per_image({e: rank(image, _labels(model, tokenizer, labels, templates_for(e, templates)), labels,
                               top_k, logit_scale(model))
                       for e, labels in vocabulary.items()}, len(image))


def _labels(model, tokenizer, labels, templates):
    with eval_mode(model):
        return label_embeddings(model, tokenizer, labels, templates)


def _per_image(by_entity: dict[str, list[list[Prediction]]], n: int) -> list[dict[str, list[Prediction]]]:
    return [{e: rows[i] for e, rows in by_entity.items()} for i in range(n)]


def accuracy(predictions: list[dict[str, list[Prediction]]], truth: dict[str, list[str]]) -> dict[str, float]:
    """Top-1 accuracy (%) per entity of ``predictions`` against true labels ``{entity: [label per image]}``."""
    out = {}
    for e in predictions[0] if predictions else ():
        right = sum(p[e][0].label == t for p, t in zip(predictions, truth[e]))
        out[e] = 100.0 * right / max(len(predictions), 1)
    return out


__all__ = ["Prediction", "classify", "embed_images", "rank", "accuracy", "logit_scale"]
