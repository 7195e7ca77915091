"""From a model and a catalogue to embeddings, and from embeddings to the named protocols.

Works on a wrapped E2 model, an unwrapped CLIP of any supported family, or (via load_adapter) an
adapter directory: everything goes through the family backend's encode_image / encode_text.

``distributed=True`` under torchrun: each rank embeds a contiguous shard of the images and texts and
every rank gets the whole catalogue's embeddings back, in catalogue order (so all ranks must call it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..backends import VisionBackend
from ..data.catalogue import ProductCatalogue
from ..data.datasets import EvalImages, collate
from ..torch_utils import eval_mode, model_device
from ..wrap import clip_towers, encode_image_regions, get_backend, is_wrapped
from ..training.distributed import gather_shards, shard
from .linear_probe import probe_entities
from .retrieval import PROTOCOLS


@dataclass
class CatalogueEmbeddings:
    image: torch.Tensor                # [N, D] one row per image
    image_products: torch.Tensor       # [N] product index of each image
    text: torch.Tensor                 # [P, D] one text per product
    regions: dict[str, torch.Tensor] | None = None   # entity -> [N, D] (wrapped models only)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256, distributed: bool = False,
                normalize: bool = False) -> torch.Tensor:
    """Text-tower embeddings ``[N, D]``, float32 on the CPU, in the order of ``texts``: the one place
    texts are embedded (the captioning and composed-retrieval integrations call it too).

    ``model``: a model (wrapped or not, of any family e2-adapter knows, or any module with its own
    ``encode_image`` / ``encode_text``: ``wrap.clip_towers``) or its ``VisionBackend``. It runs in eval
    mode for the call (E2's fusion samples Gumbel noise only in training); every module's own flag is
    restored after. ``normalize``: L2-normalised rows (what the captioners train on); raw otherwise.
    """
    towers = model if isinstance(model, VisionBackend) else clip_towers(model)
    module = towers.model if isinstance(towers, VisionBackend) else towers
    device = model_device(module)
    texts = list(texts)
    mine, counts = shard(len(texts), distributed)
    texts = texts[mine.start:mine.stop]
    chunks = []
    with eval_mode(module):
        for i in range(0, len(texts), batch_size):
            out = towers.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
            chunks.append((F.normalize(out, dim=-1) if normalize else out).cpu())
    if not chunks and not distributed:
        return torch.empty(0)
    return gather_shards(torch.cat(chunks), counts, device)


@torch.no_grad()
def embed_catalogue(model, catalogue: ProductCatalogue, transform, tokenizer, views: str = "first",
                    batch_size: int = 128, regions: bool = False, num_workers: int = 0,
                    distributed: bool = False) -> CatalogueEmbeddings:
    was_training = model.training
    model.eval()
    backend = get_backend(model)
    device = model_device(model)
    want_regions = regions and is_wrapped(model)
    images, region_rows = [], {}
    dataset = EvalImages(catalogue, transform, views=views)
    mine, counts = shard(len(dataset), distributed)
    loader = DataLoader(Subset(dataset, mine) if len(counts) > 1 else dataset, batch_size=batch_size,
                        collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))  # leave the global RNG alone
    for batch in loader:
        pixels = batch["image"].to(device)
        if want_regions:
            out = encode_image_regions(model, pixels)
            images.append(out.image.float().cpu())
            for e, v in out.regions.items():
                region_rows.setdefault(e, []).append(v.float().cpu())
        else:
            images.append(backend.encode_image(pixels).float().cpu())
    text = embed_texts(backend, tokenizer, catalogue.texts(), distributed=distributed)
    model.train(was_training)
    gathered_regions = {e: gather_shards(torch.cat(v), counts, device) for e, v in region_rows.items()}
    return CatalogueEmbeddings(gather_shards(torch.cat(images), counts, device),
                               torch.tensor(dataset.products, dtype=torch.long), text,
                               gathered_regions if want_regions else None)


def retrieval_metrics(emb_first: CatalogueEmbeddings, catalogue: ProductCatalogue, protocols=("product-full",),
                      emb_all: CatalogueEmbeddings | None = None, seed: int = 0) -> dict[str, dict]:
    """Run the named protocols (spec section 5). image-full needs ``emb_all`` (every view)."""
    results = {}
    for name in protocols:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
        if name == "product-full":
            results[name] = PROTOCOLS[name](emb_first.image, emb_first.text)
        elif name == "sample-100":
            results[name] = PROTOCOLS[name](emb_first.image, emb_first.text, catalogue.groups(), seed=seed)
        else:
            if emb_all is None:
                raise ValueError("image-full needs the embeddings of every view (views='all')")
            results[name] = PROTOCOLS[name](emb_all.image, emb_all.image_products, emb_all.text,
                                            torch.arange(len(catalogue)))
    return results


def evaluate(model, catalogue: ProductCatalogue, transform, tokenizer, protocols=("product-full",),
             batch_size: int = 128, seed: int = 0, distributed: bool = False) -> dict[str, dict]:
    """Retrieval on a validation catalogue under each named protocol (``distributed``: the embedding
    is sharded across torchrun ranks; every rank computes the same metrics)."""
    first = embed_catalogue(model, catalogue, transform, tokenizer, "first", batch_size, distributed=distributed)
    every = embed_catalogue(model, catalogue, transform, tokenizer, "all", batch_size, distributed=distributed) \
        if "image-full" in protocols else None
    return retrieval_metrics(first, catalogue, protocols, every, seed)


def linear_probe_entities(model, train: ProductCatalogue, test: ProductCatalogue, transform, tokenizer,
                          entities=None, batch_size: int = 128, distributed: bool = False) -> dict[str, float]:
    """Per-entity linear probe accuracy (%) on frozen global image embeddings (spec section 6)."""
    entities = tuple(entities or test.entities)
    tr = embed_catalogue(model, train, transform, tokenizer, "first", batch_size, distributed=distributed)
    te = embed_catalogue(model, test, transform, tokenizer, "first", batch_size, distributed=distributed)
    train_tags, test_tags = train.all_tags(), test.all_tags()
    return probe_entities(tr.image, {e: train_tags[e] for e in entities}, te.image, {e: test_tags[e] for e in entities})
