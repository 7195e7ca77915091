"""CapDec: text-only training of a CLIP-prefix captioner, made robust to the image/text gap by noise.

A mapping network turns a CLIP embedding into ``prefix_length`` GPT-2 input embeddings. It is
trained on *text* embeddings with Gaussian noise added (variance 0.016 by default), so at
inference it tolerates the offset between a caption's embedding and its image's embedding.

Reference hyper-parameters (CapDec / ClipCap): transformer mapper with 8 layers, 8 heads, MLP
ratio 2, prefix 40; MLP mapper D -> E*L/2 -> E*L with tanh, prefix 10; beam 5, stop at ".",
at most 67 tokens.

Differences from CapDec's code: the MLP mapper's default prefix is 10 (ClipCap's MLP setting, kept
because a 40-token MLP prefix is a D -> 20E -> 40E network; CapDec's train.py defaults to
--prefix_length 40 whatever the mapper: pass ``prefix_length=40`` to match it); training targets end
with the tokenizer's end-of-text token, which CapDec's captions do not have (the shim can stop at it
when a caption has no "."); noise options ``uniform_noise`` and ``train_capdec(modality_offset=...)``
are CapDec's ``--uniform_noise`` / ``--add_modality_offset`` (off by default, as there). Checkpoints of
CapDec's train.py load with ``integrations.convert.capdec_from_original``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from integrations.captioning.checkpoint import load_weights, read_config, save_checkpoint
from integrations.captioning.decoding import beam_decode, greedy_decode
from integrations.captioning.encoders import ClipLike, check_width, embed_images
from integrations.captioning.tokenizers import HFTokenizer, TextTokenizer, load_tokenizer

MAPPINGS = ("transformer", "mlp")
DEFAULT_PREFIX_LENGTH = {"transformer": 40, "mlp": 10}


def inject_noise(embeddings: torch.Tensor, variance: float = 0.016, generator: torch.Generator | None = None,
                 renormalize: bool = True, uniform: bool = False,
                 modality_offset: torch.Tensor | None = None) -> torch.Tensor:
    """CapDec's noise: L2-normalise, add N(0, variance) per dimension, L2-normalise again.

    ``uniform=True``: CapDec's ``--uniform_noise``, a point drawn uniformly from the ball of radius
    sqrt(variance) instead (a random direction, radius ``sqrt(variance) * u ** (1 / D)``).
    ``modality_offset``: CapDec's ``--add_modality_offset``, a [D] vector (the mean image embedding
    minus the mean text embedding) added after the noise, before the second normalisation.
    With ``renormalize=False`` the noisy vector is returned before the second normalisation
    (what the statistics in the paper describe).
    """
    x = F.normalize(embeddings.float(), dim=-1)
    if variance > 0:
        cpu = "cpu" if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=cpu)
        if uniform:
            radius = torch.rand(x.shape[0], 1, generator=generator, device=cpu) ** (1.0 / x.shape[1])
            noise = F.normalize(noise, dim=-1) * radius
        x = x + noise.to(x.device) * math.sqrt(variance)
    if modality_offset is not None:
        x = x + modality_offset.to(x.device, x.dtype)
    return F.normalize(x, dim=-1) if renormalize else x


@dataclass
class CapDecConfig:
    embed_dim: int                      # width of the CLIP joint space the mapper reads
    mapping: str = "transformer"        # "transformer" or "mlp"
    prefix_length: int | None = None    # GPT-2 prefix positions; None: 40 (transformer) / 10 (mlp)
    clip_length: int | None = None      # transformer: tokens the embedding is expanded to; None: prefix_length
    mapper_layers: int = 8
    mapper_heads: int = 8
    noise_variance: float = 0.016
    uniform_noise: bool = False         # CapDec's --uniform_noise (see inject_noise)
    stop_token: str | None = "."        # None: captions end only at the tokenizer's end-of-text
    max_tokens: int = 67
    beam_size: int = 5
    train_lm: bool = True               # CapDec fine-tunes GPT-2 with the mapper
    encoder: str | None = None          # which encoder's text tower trained it (for error messages)
    lm_config: dict = field(default_factory=dict, repr=False)  # the GPT2Config, to rebuild offline

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        if self.prefix_length is None:
            self.prefix_length = DEFAULT_PREFIX_LENGTH[self.mapping]
        if self.clip_length is None:
            self.clip_length = self.prefix_length


class MLPMapper(nn.Module):
    """embedding -> E*L/2 -> E*L (tanh), reshaped into L prefix embeddings."""

    def __init__(self, embed_dim: int, lm_width: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length, self.lm_width = prefix_length, lm_width
        out = lm_width * prefix_length
        self.net = nn.Sequential(nn.Linear(embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.lm_width)


class TransformerMapper(nn.Module):
    """The embedding becomes ``clip_length`` tokens, a transformer mixes them with ``prefix_length``
    learned constants, and the constants' outputs are the prefix."""

    def __init__(self, embed_dim: int, lm_width: int, prefix_length: int, clip_length: int,
                 layers: int, heads: int) -> None:
        super().__init__()
        self.clip_length, self.lm_width = clip_length, lm_width
        self.expand = nn.Linear(embed_dim, clip_length * lm_width)
        self.constants = nn.Parameter(torch.randn(prefix_length, lm_width))
        layer = nn.TransformerEncoderLayer(lm_width, heads, dim_feedforward=2 * lm_width, dropout=0.0,
                                           activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.expand(x).view(x.shape[0], self.clip_length, self.lm_width)
        constants = self.constants.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([tokens, constants], dim=1))[:, self.clip_length:]


def small_gpt2_config(tokenizer: TextTokenizer, n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
                      n_positions: int = 256):
    """A randomly initialised GPT-2 sized for CPU work over ``tokenizer``'s vocabulary (offline demos,
    tests); real runs use the pretrained "gpt2"."""
    from transformers import GPT2Config
    return GPT2Config(vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      n_positions=n_positions, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)


def _load_lm(lm):
    from transformers import GPT2Config, GPT2LMHeadModel
    if isinstance(lm, str):
        try:
            return GPT2LMHeadModel.from_pretrained(lm)
        except OSError as exc:
            raise RuntimeError(f"could not load GPT-2 {lm!r} (offline?). Pass a GPT2Config for a randomly "
                               "initialised model, or a local path to the weights.") from exc
    if isinstance(lm, GPT2Config):
        return GPT2LMHeadModel(lm)
    if isinstance(lm, dict):
        return GPT2LMHeadModel(GPT2Config.from_dict(lm))
    return lm


class CapDec(nn.Module):
    """Mapping network + GPT-2 + its tokenizer. The CLIP encoder is passed in, never stored."""

    kind = "capdec"

    def __init__(self, config: CapDecConfig, lm: nn.Module, tokenizer: TextTokenizer) -> None:
        super().__init__()
        if tokenizer.vocab_size > lm.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the language model only "
                             f"{lm.config.vocab_size}")
        self.config, self.lm, self.tokenizer = config, lm, tokenizer
        config.lm_config = lm.config.to_dict()
        width = lm.config.n_embd
        if config.mapping == "mlp":
            self.mapper = MLPMapper(config.embed_dim, width, config.prefix_length)
        else:
            self.mapper = TransformerMapper(config.embed_dim, width, config.prefix_length, config.clip_length,
                                            config.mapper_layers, config.mapper_heads)
        self.lm.requires_grad_(config.train_lm)

    @classmethod
    def create(cls, embed_dim: int, lm="gpt2", tokenizer: TextTokenizer | None = None, **config) -> "CapDec":
        """``lm``: a pretrained name or path ("gpt2"), a ``GPT2Config`` / dict (random init) or a model.
        ``tokenizer`` defaults to the pretrained model's own."""
        if tokenizer is None:
            if not isinstance(lm, str):
                raise ValueError("a tokenizer is needed when lm is not a pretrained name")
            try:
                tokenizer = HFTokenizer.from_pretrained(lm)
            except OSError as exc:
                raise RuntimeError(f"could not load the {lm!r} tokenizer (offline?). Pass tokenizer= "
                                   "(e.g. WordTokenizer.fit(captions)) with a GPT2Config for lm.") from exc
        return cls(CapDecConfig(embed_dim=embed_dim, **config), _load_lm(lm), tokenizer)

    # -- training ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "CapDec":
        super().train(mode)
        if not self.config.train_lm:
            self.lm.eval()  # a frozen GPT-2 keeps its dropout off (ClipCap's prefix-only mode)
        return self

    def encode_captions(self, captions: Sequence[str], max_tokens: int | None = None):
        """Token ids + end-of-text, right-padded: (ids [N, T], mask [N, T])."""
        room = self.lm.config.n_positions - self.config.prefix_length
        limit = room if max_tokens is None else min(room, max_tokens)
        rows = [(self.tokenizer.encode(c) + [self.tokenizer.eos_id])[:limit] for c in captions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        check_width(self.config.embed_dim, embeddings.shape[-1], self.config.encoder)
        return self.mapper(embeddings.to(self.device, torch.float32))

    def forward(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits predicting ``ids[:, t]`` at every caption position t: [B, T, V]."""
        prefix = self.prefix(embeddings)
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(mask.shape[0], prefix.shape[1], dtype=mask.dtype, device=mask.device), mask], 1)
        logits = self.lm(inputs_embeds=inputs, attention_mask=full_mask).logits
        return logits[:, prefix.shape[1] - 1: -1]

    def loss(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy over the real caption tokens (padding excluded)."""
        logits = self(embeddings, ids, mask)
        labels = ids.masked_fill(mask == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    # -- inference --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_id}
        if self.config.stop_token:
            pieces = self.tokenizer.encode(self.config.stop_token)
            if len(pieces) != 1:
                raise ValueError(f"stop token {self.config.stop_token!r} is not one token for this tokenizer")
            ids.add(pieces[0])
        return ids

    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, method: str = "beam", beam_size: int | None = None,
                 max_tokens: int | None = None) -> list[str]:
        """Captions for CLIP embeddings [B, D] (image embeddings at inference); normalised here."""
        was_training = self.training
        self.eval()
        try:
            prefix = self.prefix(F.normalize(embeddings.float(), dim=-1))
            max_tokens = max_tokens or self.config.max_tokens
            if method == "beam":
                ids = beam_decode(self.lm, prefix, max_tokens, self.stop_ids(), beam_size or self.config.beam_size)
            elif method == "greedy":
                ids = greedy_decode(self.lm, prefix, max_tokens, self.stop_ids())
            else:
                raise ValueError(f"method must be 'beam' or 'greedy', got {method!r}")
        finally:
            self.train(was_training)
        return [self.tokenizer.decode(row) for row in ids]

    def caption(self, encoder: ClipLike, images: torch.Tensor, batch_size: int = 64, **generate_kwargs) -> list[str]:
        """``encode_image`` -> normalise -> mapper -> GPT-2, for preprocessed images [B, 3, H, W]."""
        out = []
        for start in range(0, len(images), batch_size):
            embeddings = embed_images(encoder, images[start:start + batch_size])
            out += self.generate(embeddings, **generate_kwargs)
        return out

    # -- files ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """``model.safetensors`` (mapper + GPT-2) and ``config.json`` (sizes, tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer = self.tokenizer.save(directory)
        return save_checkpoint(directory, self, {"kind": self.kind, "config": asdict(self.config),
                                                 "tokenizer": tokenizer})

    @classmethod
    def from_pretrained(cls, directory: str | Path, tokenizer: TextTokenizer | None = None,
                        map_location: str | torch.device = "cpu") -> "CapDec":
        saved = read_config(directory, cls.kind)
        config = CapDecConfig(**saved["config"])
        tokenizer = tokenizer or load_tokenizer(saved["tokenizer"], directory)
        model = cls(config, _load_lm(config.lm_config), tokenizer)
        return load_weights(directory, model).to(map_location)
