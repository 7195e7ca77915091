"""SEARLE's own training objective (Baldrati et al., ICCV 2023), an option beside Pic2Word's loss.

SEARLE trains the same mapping network phi (``PseudoWordMapper``) in two stages, both towers frozen:

1. **Optimisation-based textual inversion (OTI)**, per image: a pseudo-word token v, initialised at
   random, is optimised so that the text embedding of "a photo of $" with v in place of "$" matches
   the image embedding (cosine loss), plus a regulariser that keeps "a photo of $ that <phrase>"
   close to "a photo of <concept> that <phrase>" for phrases about concepts the image shows (so v
   behaves like a word for that concept). The result is the EMA of v over the steps.
2. **Distillation**: phi learns to predict the OTI tokens from image embeddings: SEARLE's contrastive term (a symmetric NT-Xent between the batch's OTI tokens
   and phi's tokens, temperature 0.25: each predicted token must be nearer its own OTI token than any
   other token of the batch), plus the same phrase regulariser on phi's tokens.

``train_searle`` runs both; ``cir train --objective searle`` selects it from the CLI. The mapper gets
SEARLE's prompts (placeholder "$", ``MapperConfig.for_style("searle")``) unless a config is given.

Differences from SEARLE's public code, kept on purpose:

* **Phrases.** SEARLE generates them with GPT-Neo 2.7B from "a photo of {concept} that" for the
  ~20k Open Images class names. Here they come from the user (``PhraseBank.from_mapping`` / a JSON
  file ``{concept: [phrases]}``), or are built from a concept list with the small
  ``BUILT_IN_CONTINUATIONS`` ("a photo of {concept} that {continuation}"). The default concepts are
  the rule rewriter's garment words. No language model is run.
* **Concepts per image.** SEARLE ranks its vocabulary against each image with CLIP and an ensemble of
  prompts, keeping the top 15 (OTI) / 150 (phi); here one prompt, "a photo of a {concept}", with the
  model being trained for, and the same ``top_k`` arguments.
* **Templates.** SEARLE's OTI samples one of 24 PALAVRA templates per image and step; the default
  here is the one prompt "a photo of $"; ``templates=`` takes any list.
* **Distillation loss.** As SEARLE's public ``train_phi.py``: the contrastive term (weight 1) and the
  phrase regulariser (weight 0.75). An optional squared distance to the OTI token
  (``lambda_distance``, default 0, which is the public code's loss) is there for users who want phi
  to match the tokens' scale as well as their directions.
* No mixed precision or gradient scaler (SEARLE runs OTI and phi under CUDA autocast); the images
  are the caller's (SEARLE inverts ImageNet's test set and trains phi on it).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from e2_adapter.evaluation.embed import embed_texts
from e2_adapter.torch_utils import model_device

from .pic2word import MapperConfig, PseudoWordMapper, check_compatible, fit_mapper, frozen
from .text_injection import encode_text_with_pseudo_tokens, placeholder_token_id, token_width

Tokenizer = Callable[[list[str]], torch.Tensor]

# Endings for "a photo of {concept} that ...": what a catalogue or street photo of a garment shows.
BUILT_IN_CONTINUATIONS = (
    "is worn by a model", "is laid flat on a table", "hangs on a rail in a shop", "is seen from the front",
    "is shown on a white background", "is worn outdoors", "is folded in a drawer", "is seen up close",
)
CONCEPT_PROMPT = "a photo of a {concept}"


def default_concepts() -> list[str]:
    from .rewriter import DEFAULT_GARMENTS
    return list(dict.fromkeys(DEFAULT_GARMENTS))


@dataclass
class PhraseBank:
    """Concepts and, per concept, phrases that name it (the regulariser's sentences)."""
    concepts: list[str]
    phrases: list[list[str]]

    def __post_init__(self):
        if not self.concepts:
            raise ValueError("the phrase bank needs at least one concept")
        if len(self.phrases) != len(self.concepts):
            raise ValueError(f"{len(self.concepts)} concepts but {len(self.phrases)} phrase lists")
        for concept, phrases in zip(self.concepts, self.phrases):
            if not phrases:
                raise ValueError(f"concept {concept!r} has no phrases")
            for phrase in phrases:
                if concept not in phrase:
                    raise ValueError(f"phrase {phrase!r} does not contain its concept {concept!r}: the "
                                     "regulariser replaces the concept by the pseudo-word, so it must appear")

    @classmethod
    def from_concepts(cls, concepts: Sequence[str], continuations: Sequence[str] = BUILT_IN_CONTINUATIONS):
        concepts = [c.strip() for c in concepts if c.strip()]
        return cls(concepts, [[f"a photo of {c} that {end}" for end in continuations] for c in concepts])

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[str]]):
        return cls([str(c) for c in mapping], [[str(p) for p in ps] for ps in mapping.values()])

    @classmethod
    def load(cls, path: str | Path) -> "PhraseBank":
        """A JSON file: a list of concepts (phrases built in) or ``{concept: [phrases]}``; or a text
        file with one concept per line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"concepts file not found: {path}")
        if path.suffix.lower() != ".json":
            return cls.from_concepts(path.read_text().splitlines())
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if isinstance(data, list) and all(isinstance(c, str) for c in data):
            return cls.from_concepts(data)
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return cls.from_mapping(data)
        raise ValueError(f"{path} must hold a JSON list of concepts or an object {{concept: [phrases]}}")

    @torch.no_grad()
    def assign(self, model: nn.Module, tokenizer: Tokenizer, image_embeddings: torch.Tensor,
               top_k: int) -> torch.Tensor:
        """Per image, the indices of its ``top_k`` concepts by cosine of image and concept prompt."""
        texts = embed_texts(model, tokenizer, [CONCEPT_PROMPT.format(concept=c) for c in self.concepts],
                            normalize=True)
        scores = F.normalize(image_embeddings.float(), dim=-1) @ texts.T
        return scores.topk(min(top_k, len(self.concepts)), dim=1).indices


class PhraseRegulariser:
    """Samples, per image, a phrase of one of its concepts and scores the pseudo-word in its place:
    1 - cos(text("...$..." with the pseudo-word), text(the phrase)) averaged over the batch."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, bank: PhraseBank, image_concepts: torch.Tensor,
                 placeholder: str, rng: random.Random):
        self.model, self.tokenizer, self.bank, self.rng = model, tokenizer, bank, rng
        self.image_concepts = image_concepts.tolist()
        self.placeholder = placeholder
        self.flat = [(c, p) for c, phrases in enumerate(bank.phrases) for p in phrases]
        self.offsets = [0]
        for phrases in bank.phrases:
            self.offsets.append(self.offsets[-1] + len(phrases))
        self.targets = embed_texts(model, tokenizer, [p for _, p in self.flat])  # frozen: encoded once

    def __call__(self, image_indices: Sequence[int], pseudo: torch.Tensor, placeholder_id: int) -> torch.Tensor:
        picks = []
        for i in image_indices:
            concept = self.rng.choice(self.image_concepts[i])
            picks.append(self.offsets[concept] + self.rng.randrange(len(self.bank.phrases[concept])))
        device = pseudo.device
        texts = [self.flat[j][1].replace(self.bank.concepts[self.flat[j][0]], f" {self.placeholder} ", 1)
                 for j in picks]
        tokens = self.tokenizer(texts).to(device)
        with_pseudo = encode_text_with_pseudo_tokens(self.model, tokens, pseudo, placeholder_id).float()
        return cosine_loss(with_pseudo, self.targets[picks].to(device))


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(a_i, b_i) (``nn.CosineEmbeddingLoss`` with every target +1)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def searle_contrastive_loss(targets: torch.Tensor, predicted: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """SEARLE's distillation term: NT-Xent over the 2B vectors {targets, predicted}. Each vector's
    positive is its partner (target i <-> predicted i); every other vector of the 2B, the partner
    included, is in the denominator, the vector itself is not."""
    z = F.normalize(torch.cat([targets, predicted]).float(), dim=-1)
    n = len(targets)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


@dataclass
class InversionResult:
    tokens: torch.Tensor                            # [N, width] the EMA tokens (what phi distils), CPU
    last_tokens: torch.Tensor                       # [N, width] the optimised tokens at the last step
    losses: list[list[float]] = field(default_factory=list)  # per image batch, the loss of every step


def invert_images(model: nn.Module, tokenizer: Tokenizer, image_embeddings: torch.Tensor, *,
                  bank: Optional[PhraseBank] = None, templates: Optional[Sequence[str]] = None,
                  placeholder: str = "$", steps: int = 350, batch_size: int = 32, lr: float = 2e-2,
                  weight_decay: float = 0.01, lambda_cos: float = 1.0, lambda_reg: float = 0.5,
                  ema_decay: float = 0.99, top_k: int = 15, seed: int = 0) -> InversionResult:
    """OTI: one pseudo-word per image embedding ``[N, D]`` (SEARLE's defaults: 350 steps, AdamW
    lr 2e-2, weight decay 0.01, init N(0, 0.02), EMA 0.99, loss (1 * cosine + 0.5 * regulariser) / 1.5).
    ``templates`` default to "a photo of {placeholder}"; ``lambda_reg=0`` drops the regulariser."""
    if image_embeddings.dim() != 2 or len(image_embeddings) == 0:
        raise ValueError(f"need image embeddings [N, D], got shape {tuple(image_embeddings.shape)}")
    if lambda_cos < 0 or lambda_reg < 0 or lambda_cos + lambda_reg == 0:
        raise ValueError("lambda_cos and lambda_reg must be >= 0 and not both 0")
    templates = list(templates) if templates is not None else [f"a photo of {placeholder}"]
    for t in templates:
        if placeholder not in t:
            raise ValueError(f"template {t!r} must contain the placeholder {placeholder!r}")
    device, width = model_device(model), token_width(model)
    placeholder_id = placeholder_token_id(tokenizer, placeholder)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    regulariser = None
    if lambda_reg > 0:
        bank = bank or PhraseBank.from_concepts(default_concepts())
        concepts = bank.assign(model, tokenizer, image_embeddings, top_k)
        regulariser = PhraseRegulariser(model, tokenizer, bank, concepts, placeholder, rng)
    ema_all, last_all, losses = [], [], []
    with frozen(model):
        for start in range(0, len(image_embeddings), batch_size):
            images = image_embeddings[start:start + batch_size].to(device).float()
            index = list(range(start, start + len(images)))
            token = nn.Parameter((torch.randn(len(images), width, generator=generator) * 0.02).to(device))
            ema = token.detach().clone()
            optimizer = torch.optim.AdamW([token], lr=lr, weight_decay=weight_decay)
            batch_losses = []
            for _ in range(steps):
                prompts = [rng.choice(templates) for _ in index]
                texts = encode_text_with_pseudo_tokens(model, tokenizer(prompts).to(device), token, placeholder_id)
                loss = lambda_cos * cosine_loss(texts, images)
                if regulariser is not None:
                    loss = loss + lambda_reg * regulariser(index, token, placeholder_id)
                loss = loss / (lambda_cos + lambda_reg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema = ema_decay * ema + (1 - ema_decay) * token.detach()
                batch_losses.append(loss.item())
            ema_all.append(ema.cpu())
            last_all.append(token.detach().cpu())
            losses.append(batch_losses)
    return InversionResult(torch.cat(ema_all), torch.cat(last_all), losses)


def distill_mapper(model: nn.Module, tokenizer: Tokenizer, image_embeddings: torch.Tensor, oti_tokens: torch.Tensor,
                   config: Optional[MapperConfig] = None, *, bank: Optional[PhraseBank] = None, steps: int = 1000,
                   batch_size: int = 256, lr: float = 1e-4, weight_decay: float = 0.01,
                   lambda_distance: float = 0.0, lambda_contrastive: float = 1.0, temperature: float = 0.25,
                   lambda_reg: float = 0.75, top_k: int = 150, seed: int = 0,
                   mapper: Optional[PseudoWordMapper] = None,
                   log: Optional[Callable[[int, float], None]] = None) -> tuple[PseudoWordMapper, list[float]]:
    """Train phi to predict ``oti_tokens`` [N, width] from ``image_embeddings`` [N, D] (SEARLE's
    defaults: AdamW lr 1e-4, weight decay 0.01, batch 256, temperature 0.25, regulariser 0.75)."""
    if len(oti_tokens) != len(image_embeddings):
        raise ValueError(f"{len(oti_tokens)} OTI tokens for {len(image_embeddings)} image embeddings")
    if len(image_embeddings) < 2:
        raise ValueError("distillation needs at least 2 images (the contrastive term compares a batch)")
    device = model_device(model)
    torch.manual_seed(seed)  # a new mapper's initial weights: ``seed`` decides the run, not the caller's RNG
    if mapper is None:
        config = config or MapperConfig.for_style("searle", input_dim=image_embeddings.shape[1],
                                                  output_dim=token_width(model))
        mapper = PseudoWordMapper(config)
    check_compatible(mapper, model)
    if oti_tokens.shape[1] != mapper.config.output_dim:
        raise ValueError(f"OTI tokens have width {oti_tokens.shape[1]}, the mapper predicts {mapper.config.output_dim}")
    placeholder_id = placeholder_token_id(tokenizer, mapper.config.placeholder)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    regulariser = None
    if lambda_reg > 0:
        bank = bank or PhraseBank.from_concepts(default_concepts())
        concepts = bank.assign(model, tokenizer, image_embeddings, top_k)
        regulariser = PhraseRegulariser(model, tokenizer, bank, concepts, mapper.config.placeholder, rng)
    torch.manual_seed(seed)  # dropout masks
    mapper.to(device).train()
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=weight_decay)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        predicted = mapper(image_embeddings[index].to(device))
        target = oti_tokens[index].to(device).float()
        loss = lambda_distance * F.mse_loss(predicted.float(), target)
        loss = loss + lambda_contrastive * searle_contrastive_loss(target, predicted, temperature)
        if regulariser is not None:
            loss = loss + lambda_reg * regulariser(index.tolist(), predicted, placeholder_id)
        return loss

    with frozen(model):
        losses = fit_mapper(batch_loss, optimizer, len(image_embeddings), steps, batch_size, generator, log)
    return mapper.eval(), losses


def train_searle(model: nn.Module, tokenizer: Tokenizer, image_embeddings: torch.Tensor,
                 config: Optional[MapperConfig] = None, *, bank: Optional[PhraseBank] = None,
                 oti_steps: int = 350, oti_batch_size: int = 32, steps: int = 1000, batch_size: int = 256,
                 lr: float = 1e-4, weight_decay: float = 0.01, seed: int = 0, oti: Optional[dict] = None,
                 distill: Optional[dict] = None,
                 log: Optional[Callable[[int, float], None]] = None) -> tuple[PseudoWordMapper, dict]:
    """OTI on every image, then phi distilled from the OTI tokens. Returns the mapper and a record
    ``{"oti_losses": [[...] per image batch], "losses": [...], "oti_tokens": tensor}``. ``oti`` and
    ``distill`` pass further keyword arguments to ``invert_images`` / ``distill_mapper``."""
    config = config or MapperConfig.for_style("searle", input_dim=image_embeddings.shape[1],
                                              output_dim=token_width(model))
    inverted = invert_images(model, tokenizer, image_embeddings, bank=bank, placeholder=config.placeholder,
                             steps=oti_steps, batch_size=oti_batch_size, seed=seed, **(oti or {}))
    mapper, losses = distill_mapper(model, tokenizer, image_embeddings, inverted.tokens, config, bank=bank,
                                    steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                    seed=seed, log=log, **(distill or {}))
    return mapper, {"oti_losses": inverted.losses, "losses": losses, "oti_tokens": inverted.tokens}
