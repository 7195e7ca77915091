"""Trained zero-shot composed retrieval, Pic2Word / SEARLE style.

A mapping network phi turns an image embedding into a pseudo-word: a vector in the text tower's
token-embedding space. At query time it replaces the placeholder of "a photo of $ that {modification}"
(``text_injection.py``) and the text embedding of that prompt is the query.

Training needs images only and keeps both towers frozen (Pic2Word's objective): the text embedding
of "a photo of $" with the image's pseudo-word must pick out that image among the batch (symmetric
InfoNCE with the model's own logit scale). Image embeddings are computed once, since the image tower
does not change.

Architecture (SEARLE's phi): Linear -> GELU -> Dropout, ``hidden_layers`` times (width
``hidden_dim``, 2048 in SEARLE = 4 x 512 for ViT-B/32), then a Linear to the token width. SEARLE's
public code uses two hidden layers and dropout 0.5, Pic2Word a similar MLP with ReLU; both are one
config away.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .cirevl import ImageFeatures, file_identity, model_device
from .fashioniq import FashionIQ, Triplet, join_captions
from .text_injection import PLACEHOLDER, encode_text_with_pseudo_tokens, placeholder_token_id, token_width

CONFIG_NAME = "mapper_config.json"
# Pic2Word's IM2TEXT puts dropout before its ReLU; dropout scales by a non-negative mask, so the two
# orders compute the same function and share this layout (and its state-dict keys).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
WEIGHTS_NAME = "mapper.safetensors"


@dataclass
class MapperConfig:
    input_dim: int            # image embedding width (the joint space, e.g. 512)
    output_dim: int           # text tower token width (e.g. 512 for ViT-B/32's text tower)
    hidden_dim: int = 2048
    hidden_layers: int = 2
    dropout: float = 0.5
    activation: str = "gelu"  # "gelu" (SEARLE's phi) or "relu" (Pic2Word's IM2TEXT: hidden 512, dropout 0.1)
    placeholder: str = PLACEHOLDER
    train_prompt: str = "a photo of $"
    query_prompt: str = "a photo of $ that {modification}"

    def __post_init__(self):
        for name in ("train_prompt", "query_prompt"):
            if self.placeholder not in getattr(self, name):
                raise ValueError(f"{name} {getattr(self, name)!r} must contain the placeholder {self.placeholder!r}")
        if "{modification}" not in self.query_prompt:
            raise ValueError("query_prompt must contain '{modification}'")
        if self.hidden_layers < 0:
            raise ValueError("hidden_layers must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "MapperConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mapper config not found: {path}")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PseudoWordMapper(nn.Module):
    """phi: image embedding [B, input_dim] -> pseudo-word token [B, output_dim]."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        layers, width = [], config.input_dim
        for _ in range(config.hidden_layers):
            layers += [nn.Linear(width, config.hidden_dim), ACTIVATIONS[config.activation](), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        layers.append(nn.Linear(width, config.output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        if image_embeddings.shape[-1] != self.config.input_dim:
            raise ValueError(f"the mapper expects image embeddings of width {self.config.input_dim}, got "
                             f"{image_embeddings.shape[-1]}: it was trained for another model")
        return self.layers(image_embeddings.to(self.layers[0].weight.dtype))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "PseudoWordMapper":
        directory = Path(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"mapper weights not found: {weights} (expected {WEIGHTS_NAME} and "
                                    f"{CONFIG_NAME} in {directory}, as written by PseudoWordMapper.save)")
        mapper = cls(MapperConfig.load(directory / CONFIG_NAME))
        mapper.load_state_dict(load_file(str(weights), device=str(map_location)))
        return mapper.eval()


def check_compatible(mapper: PseudoWordMapper, model: nn.Module) -> None:
    """Clear error when a mapper meets a text tower of another width."""
    width = token_width(model)
    if mapper.config.output_dim != width:
        raise ValueError(f"the mapper produces tokens of width {mapper.config.output_dim} but this model's text "
                         f"tower has token width {width}; train a mapper for this model")


class frozen:
    """Context: ``model`` in eval mode with no parameter requiring grad; restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.training = self.model.training
        self.model.eval().requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        for p, flag in zip(self.model.parameters(), self.flags):
            p.requires_grad_(flag)
        self.model.train(self.training)


def logit_scale_of(model: nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        return 1 / 0.07
    return float(torch.as_tensor(scale).detach().float().exp().clamp(max=100).reshape(-1)[0])


def pic2word_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric InfoNCE between images and their "a photo of $" texts (in-batch negatives)."""
    image = F.normalize(image_embeddings.float(), dim=-1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_mapper(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], image_embeddings: torch.Tensor,
                 config: Optional[MapperConfig] = None, *, steps: int = 1000, batch_size: int = 256,
                 lr: float = 1e-4, weight_decay: float | None = None, seed: int = 0,
                 mapper: Optional[PseudoWordMapper] = None,
                 log: Optional[Callable[[int, float], None]] = None) -> tuple[PseudoWordMapper, list[float]]:
    """Train phi on image embeddings ``[N, D]`` (from ``model.encode_image``) with both towers frozen.

    Returns the mapper (in eval mode) and the loss of every step. ``weight_decay`` None: 0.1 for the
    ReLU (Pic2Word) mapper, Pic2Word's value; 0.01 (AdamW's default) for the GELU (SEARLE) one.
    """
    if image_embeddings.dim() != 2 or len(image_embeddings) < 2:
        raise ValueError(f"need image embeddings [N >= 2, D], got shape {tuple(image_embeddings.shape)}")
    device = model_device(model)
    if mapper is None:
        config = config or MapperConfig(input_dim=image_embeddings.shape[1], output_dim=token_width(model))
        mapper = PseudoWordMapper(config)
    config = mapper.config
    check_compatible(mapper, model)
    if image_embeddings.shape[1] != config.input_dim:
        raise ValueError(f"image embeddings have width {image_embeddings.shape[1]}, "
                         f"the mapper expects {config.input_dim}")
    placeholder_id = placeholder_token_id(tokenizer, config.placeholder)
    prompt = tokenizer([config.train_prompt]).to(device)
    scale = logit_scale_of(model)

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    mapper.to(device).train()
    if weight_decay is None:
        weight_decay = 0.1 if config.activation == "relu" else 0.01
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = min(batch_size, len(image_embeddings))
    order, cursor, losses = torch.randperm(len(image_embeddings), generator=generator), 0, []
    with frozen(model):
        for step in range(steps):
            if cursor + batch_size > len(order):  # a fresh epoch; the last partial batch is dropped
                order, cursor = torch.randperm(len(image_embeddings), generator=generator), 0
            images = image_embeddings[order[cursor:cursor + batch_size]].to(device)
            cursor += batch_size
            pseudo = mapper(images)
            texts = encode_text_with_pseudo_tokens(model, prompt.expand(len(images), -1), pseudo, placeholder_id)
            loss = pic2word_loss(images, texts, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log is not None:
                log(step, losses[-1])
    return mapper.eval(), losses


class Pic2Word:
    """The trained composer: ``compose(triplets, dataset) -> [Q, D]``.

    The query is the text embedding of ``config.query_prompt`` with the reference's pseudo-word.
    With two relative captions (FashionIQ), SEARLE's practice is followed: the prompt is built
    with both caption orders and the two normalized embeddings are averaged.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], mapper: PseudoWordMapper,
                 image_features: ImageFeatures, average_both_orders: bool = True, batch_size: int = 256):
        check_compatible(mapper, model)
        self.model, self.tokenizer, self.mapper = model, tokenizer, mapper
        self.image_features = image_features
        self.average_both_orders = average_both_orders
        self.batch_size = batch_size
        self.placeholder_id = placeholder_token_id(tokenizer, mapper.config.placeholder)

    @torch.no_grad()
    def encode_queries(self, reference_embeddings: torch.Tensor, modifications: Sequence[str]) -> torch.Tensor:
        """Normalized query embeddings for raw reference image embeddings and modification texts."""
        device = model_device(self.model)
        self.mapper.to(device).eval()
        out = []
        with frozen(self.model):
            for i in range(0, len(modifications), self.batch_size):
                pseudo = self.mapper(reference_embeddings[i:i + self.batch_size].to(device))
                prompts = [self.mapper.config.query_prompt.format(modification=m)
                           for m in modifications[i:i + self.batch_size]]
                tokens = self.tokenizer(prompts).to(device)
                out.append(F.normalize(encode_text_with_pseudo_tokens(
                    self.model, tokens, pseudo, self.placeholder_id).float(), dim=-1).cpu())
        return torch.cat(out)

    def compose(self, triplets: Sequence[Triplet], dataset: FashionIQ) -> torch.Tensor:
        references = self.image_features([t.reference for t in triplets])
        queries = self.encode_queries(references, [join_captions(t.captions) for t in triplets])
        if self.average_both_orders and any(len(t.captions) > 1 for t in triplets):
            reversed_ = self.encode_queries(references, [join_captions(t.captions, reverse=True) for t in triplets])
            queries = F.normalize(queries + reversed_, dim=-1)
        return queries


def evaluate_pic2word(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], preprocess: Callable,
                      dataset: FashionIQ, mapper: PseudoWordMapper, cache_dir: Optional[str | Path] = None,
                      categories: Optional[Sequence[str]] = None, exclude_reference: bool = False,
                      batch_size: int = 64) -> dict:
    """Pic2Word on a FashionIQ-layout dataset: R@10 / R@50 per category and averaged."""
    from .fashioniq import evaluate
    images = ImageFeatures.for_dataset(model, preprocess, dataset, cache_dir=cache_dir, batch_size=batch_size)
    used = categories or dataset.categories
    images.precompute([n for c in used for n in dataset.gallery(c)] +
                      [t.reference for c in used for t in dataset.triplets(c)])
    composer = Pic2Word(model, tokenizer, mapper, images)
    return evaluate(dataset, composer, images, categories, exclude_reference=exclude_reference)


def embed_catalogue(model: nn.Module, preprocess: Callable, catalogue, views: str = "first",
                    cache_dir: Optional[str | Path] = None, batch_size: int = 64) -> torch.Tensor:
    """Image embeddings of a ``ProductCatalogue`` (first view of each product, or every view):
    Pic2Word's training data."""
    if views not in ("first", "all"):
        raise ValueError(f"views must be 'first' or 'all', got {views!r}")
    keys = [f"{p}/{v}" for p in range(len(catalogue))
            for v in range(1 if views == "first" else catalogue.num_views(p))]

    def load(key: str):
        p, v = key.split("/")
        return catalogue.load_image(int(p), int(v))

    path = Path(getattr(catalogue, "path", ""))
    source = file_identity(path) if path.is_file() else type(catalogue).__name__  # cache key of the images
    images = ImageFeatures(model, preprocess, load, cache_dir=cache_dir, identify=lambda key: f"{source}:{key}",
                           batch_size=batch_size)
    images.precompute(keys)
    return images(keys)


def embed_folder(model: nn.Module, preprocess: Callable, dataset: FashionIQ, cache_dir: Optional[str | Path] = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Image embeddings of every image a FashionIQ-layout split refers to (training without labels)."""
    images = ImageFeatures.for_dataset(model, preprocess, dataset, cache_dir=cache_dir, batch_size=batch_size)
    names = dataset.image_names()
    images.precompute(names)
    return images(names)
