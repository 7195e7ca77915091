"""Trained zero-shot composed retrieval, Pic2Word / SEARLE style.

A mapping network phi turns an image embedding into a pseudo-word: a vector in the text tower's
token-embedding space. At query time it replaces the placeholder of the query prompt
(``text_injection.py``) and the text embedding of that prompt is the query.

Training needs images only and keeps both towers frozen (Pic2Word's objective): the text embedding
of the training prompt with the image's pseudo-word must pick out that image among the batch
(symmetric InfoNCE with the model's own logit scale). Image embeddings are computed once, since the
image tower does not change. SEARLE's own objective (textual inversion, then distillation) is
``searle.py``; it trains the same ``PseudoWordMapper``.

Prompts (``PROMPT_STYLES``; the default is Pic2Word's, as its public code builds them):

* ``"pic2word"``: placeholder ``*`` (CLIP BPE id 265); training prompt ``a photo of *`` (Pic2Word
  tokenizes "a photo of" and inserts the pseudo-word before the end token, which gives the same ids);
  FashionIQ query ``a photo of * , {c2} and {c1}``: the two relative captions as written (not
  stripped), the *second* first, one query per triplet.
* ``"searle"``: placeholder ``$`` (id 259); ``a photo of $`` / ``a photo of $ that {c1} and {c2}``
  with trailing ".?, " stripped from each caption, built with both caption orders and the two
  normalized embeddings averaged (SEARLE's ``validate.py``). This was the shim's default before;
  ``MapperConfig.for_style("searle", ...)`` selects it, and a saved mapper config written before the
  ``caption_join`` field existed loads with it, so old mappers evaluate as they did.

Kept differences from Pic2Word: its mapper is trained on CC3M images with its own ViT-L/14 batch and
schedule (here: whatever images and steps the caller gives); its FashionIQ evaluation reads each
category's captions file directly, while here the shared ``fashioniq.evaluate`` protocol (gallery =
the category's image split, ties count against the query) ranks the queries.

Architecture (SEARLE's phi): Linear -> GELU -> Dropout, ``hidden_layers`` times (width
``hidden_dim``, 2048 in SEARLE = 4 x 512 for ViT-B/32), then a Linear to the token width. SEARLE's
public code uses two hidden layers and dropout 0.5, Pic2Word a similar MLP with ReLU; both are one
config away (``activation``).
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

from e2_adapter.files import atomic_write_json

from .cirevl import ImageFeatures, file_identity, model_device
from .fashioniq import FashionIQ, Triplet, join_captions
from .text_injection import encode_text_with_pseudo_tokens, placeholder_token_id, token_width

CONFIG_NAME = "mapper_config.json"
# Pic2Word's IM2TEXT puts dropout before its ReLU; dropout scales by a non-negative mask, so the two
# orders compute the same function and share this layout (and its state-dict keys).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
WEIGHTS_NAME = "mapper.safetensors"

# The prompt fields of MapperConfig per method (see the module docstring).
PROMPT_STYLES = {
    "pic2word": dict(placeholder="*", train_prompt="a photo of *", query_prompt="a photo of * , {modification}",
                     caption_join="pic2word"),
    "searle": dict(placeholder="$", train_prompt="a photo of $", query_prompt="a photo of $ that {modification}",
                   caption_join="searle"),
}
CAPTION_JOINS = ("pic2word", "searle")


@dataclass
class MapperConfig:
    input_dim: int            # image embedding width (the joint space, e.g. 512)
    output_dim: int           # text tower token width (e.g. 512 for ViT-B/32's text tower)
    hidden_dim: int = 2048
    hidden_layers: int = 2
    dropout: float = 0.5
    activation: str = "gelu"  # "gelu" (SEARLE's phi) or "relu" (Pic2Word's IM2TEXT: hidden 512, dropout 0.1)
    placeholder: str = PROMPT_STYLES["pic2word"]["placeholder"]
    train_prompt: str = PROMPT_STYLES["pic2word"]["train_prompt"]
    query_prompt: str = PROMPT_STYLES["pic2word"]["query_prompt"]
    caption_join: str = "pic2word"  # how several relative captions become one modification (CAPTION_JOINS)

    @classmethod
    def for_style(cls, style: str, input_dim: int, output_dim: int, **fields) -> "MapperConfig":
        """A config with the prompts of ``style`` ("pic2word" or "searle"); ``fields`` override."""
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {sorted(PROMPT_STYLES)}, got {style!r}")
        return cls(input_dim=input_dim, output_dim=output_dim, **{**PROMPT_STYLES[style], **fields})

    def __post_init__(self):
        if self.caption_join not in CAPTION_JOINS:
            raise ValueError(f"caption_join must be one of {CAPTION_JOINS}, got {self.caption_join!r}")
        if "{modification}" not in self.query_prompt:
            raise ValueError("query_prompt must contain '{modification}'")
        for name in ("train_prompt", "query_prompt"):
            if self.placeholder not in getattr(self, name):
                raise ValueError(f"{name} {getattr(self, name)!r} must contain the placeholder {self.placeholder!r}")
        if self.hidden_layers < 0:
            raise ValueError("hidden_layers must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "MapperConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mapper config not found: {path}")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for name in ("placeholder", "train_prompt", "query_prompt", "caption_join"):
            # Configs written before Pic2Word's prompts became the default used SEARLE's.
            data.setdefault(name, PROMPT_STYLES["searle"][name])
        return cls(**data)


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
    torch.manual_seed(seed)  # a new mapper's initial weights, and dropout masks: ``seed`` decides the run
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
    mapper.to(device).train()
    if weight_decay is None:
        weight_decay = 0.1 if config.activation == "relu" else 0.01
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=weight_decay)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        images = image_embeddings[index].to(device)
        texts = encode_text_with_pseudo_tokens(model, prompt.expand(len(images), -1), mapper(images), placeholder_id)
        return pic2word_loss(images, texts, scale)

    with frozen(model):
        losses = fit_mapper(batch_loss, optimizer, len(image_embeddings), steps, batch_size, generator, log)
    return mapper.eval(), losses


def fit_mapper(batch_loss: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, n: int,
               steps: int, batch_size: int, generator: torch.Generator,
               log: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """The mapping network's loop (Pic2Word's and SEARLE's): ``steps`` optimiser steps on
    ``batch_loss(indices)`` over shuffled epochs of the ``n`` items, the last partial batch dropped.
    Returns the loss of every step."""
    batch_size = min(batch_size, n)
    order, cursor, losses = torch.randperm(n, generator=generator), 0, []
    for step in range(steps):
        if cursor + batch_size > n:  # a fresh epoch (drop_last)
            order, cursor = torch.randperm(n, generator=generator), 0
        loss = batch_loss(order[cursor:cursor + batch_size])
        cursor += batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    return losses


def query_modification(captions: Sequence[str], caption_join: str) -> str:
    """The modification text of one query (``MapperConfig.caption_join``): "pic2word" joins the
    captions as written in reverse order ("{c2} and {c1}", Pic2Word's FashionIQ query), "searle"
    strips them and keeps their order (``fashioniq.join_captions``; ``Pic2Word`` adds the other order)."""
    if caption_join == "pic2word":
        return " and ".join(c for c in reversed(captions) if c.strip())
    if caption_join == "searle":
        return join_captions(captions)
    raise ValueError(f"caption_join must be one of {CAPTION_JOINS}, got {caption_join!r}")


class Pic2Word:
    """The trained composer: ``compose(triplets, dataset) -> [Q, D]``.

    The query is the text embedding of ``config.query_prompt`` with the reference's pseudo-word. How
    FashionIQ's two relative captions fill ``{modification}`` follows ``config.caption_join``: one
    query with "{c2} and {c1}" (Pic2Word), or both orders averaged (SEARLE). ``average_both_orders``
    True / False overrides that choice of one or two orders (the captions are joined as the style says).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], mapper: PseudoWordMapper,
                 image_features: ImageFeatures, average_both_orders: Optional[bool] = None, batch_size: int = 256):
        check_compatible(mapper, model)
        self.model, self.tokenizer, self.mapper = model, tokenizer, mapper
        self.image_features = image_features
        self.average_both_orders = average_both_orders
        self.batch_size = batch_size
        self.placeholder_id = placeholder_token_id(tokenizer, mapper.config.placeholder)

    def query_prompts(self, modifications: Sequence[str]) -> list[str]:
        return [self.mapper.config.query_prompt.format(modification=m) for m in modifications]

    @torch.no_grad()
    def encode_queries(self, reference_embeddings: torch.Tensor, modifications: Sequence[str]) -> torch.Tensor:
        """Normalized query embeddings for raw reference image embeddings and modification texts."""
        device = model_device(self.model)
        self.mapper.to(device).eval()
        out = []
        with frozen(self.model):
            for i in range(0, len(modifications), self.batch_size):
                pseudo = self.mapper(reference_embeddings[i:i + self.batch_size].to(device))
                tokens = self.tokenizer(self.query_prompts(modifications[i:i + self.batch_size])).to(device)
                out.append(F.normalize(encode_text_with_pseudo_tokens(
                    self.model, tokens, pseudo, self.placeholder_id).float(), dim=-1).cpu())
        return torch.cat(out)

    def compose(self, triplets: Sequence[Triplet], dataset: FashionIQ) -> torch.Tensor:
        references = self.image_features([t.reference for t in triplets])
        join = self.mapper.config.caption_join
        both = self.average_both_orders if self.average_both_orders is not None else join == "searle"
        queries = self.encode_queries(references, [query_modification(t.captions, join) for t in triplets])
        if both and any(len(t.captions) > 1 for t in triplets):
            # The other caption order, joined the way this style joins.
            other = [query_modification(t.captions[::-1], join) for t in triplets]
            queries = F.normalize(queries + self.encode_queries(references, other), dim=-1)
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


def embed_product_images(model: nn.Module, preprocess: Callable, catalogue, views: str = "first",
                         cache_dir: Optional[str | Path] = None, batch_size: int = 64) -> torch.Tensor:
    """Raw image embeddings ``[N, D]`` of a ``ProductCatalogue`` (first view of each product, or every
    view), cached like a gallery: the mapper's training data. (Not the library's
    ``e2_adapter.evaluation.embed.embed_catalogue``, which embeds images and texts for retrieval.)"""
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


def train_encoder_mapper(bundle, train_source, steps: int, batch_size: int, seed: int, cache_dir=None,
                         hidden_dim: int = 2048) -> PseudoWordMapper:
    """Pic2Word's phi for one encoder (each encoder needs its own: its towers define the spaces)."""
    if isinstance(train_source, FashionIQ):  # a FashionIQ split's images, else a FashionGen-layout h5
        embeddings = embed_folder(bundle.model, bundle.preprocess, train_source, cache_dir=cache_dir)
    else:
        from e2_adapter.data import FashionGenH5
        embeddings = embed_product_images(bundle.model, bundle.preprocess, FashionGenH5(train_source), cache_dir=cache_dir)
    config = MapperConfig(input_dim=embeddings.shape[1], output_dim=token_width(bundle.model), hidden_dim=hidden_dim)
    mapper, _ = train_mapper(bundle.model, bundle.tokenizer, embeddings, config, steps=steps,
                             batch_size=batch_size, seed=seed)
    return mapper


def __getattr__(name: str):
    # The old name of embed_product_images; it clashed with e2_adapter.evaluation.embed.embed_catalogue.
    if name == "embed_catalogue":
        import warnings
        warnings.warn("integrations.cir.pic2word.embed_catalogue is now embed_product_images",
                      FutureWarning, stacklevel=2)
        return embed_product_images
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
