"""DeCap: a caption decoder trained from scratch on text, driven at inference by memory projection.

Training: caption -> frozen ``encode_text`` -> normalise -> one prefix token (a linear map) -> a
small GPT-2 over CLIP's BPE ids. Inference: the image embedding is replaced by its projection
onto a memory bank M of normalised training-caption embeddings,
``normalise(softmax(e M^T / temperature) M)``, which lies in the text embedding region the
decoder was trained on. Reference sizes: 4 layers, 4 heads, width 768, captions of 20 tokens,
label smoothing 0.1, temperature 0.01, greedy decoding of at most 30 tokens.

Differences from DeCap's code kept on purpose (``DeCapConfig``; DeCap's behaviour one option away):
a caption longer than 20 tokens keeps its end token (``keep_end_on_truncate``; DeCap cuts it, so its
decoder never learns to stop after a long caption), and decoded text is tidied ("9 6 %" -> "96%",
``rewrite_text``; DeCap scores the raw BPE decode, so set it False for BLEU comparable with the paper).
The decoder may be given a smaller output vocabulary (``for_captions``), for CPU training; DeCap's
covers all 49,408 CLIP BPE ids. Original checkpoints load with ``integrations.convert.decap_from_original``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from integrations.captioning.checkpoint import load_weights, read_config, read_tensor, save_checkpoint
from integrations.captioning.decoding import beam_decode, greedy_decode
from integrations.captioning.encoders import ClipLike, check_width, embed_images
from integrations.captioning.tokenizers import ClipBPETokenizer


@dataclass
class DeCapConfig:
    embed_dim: int                  # width of the CLIP joint space
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    max_caption_tokens: int = 20    # training length, start and end tokens included
    max_tokens: int = 30            # decoding length
    temperature: float = 0.01       # memory projection softmax temperature (DeCap: 1/100)
    label_smoothing: float = 0.1
    memory_size: int = 0            # rows of the memory bank (set by set_memory)
    vocab_size: int | None = None   # None: all of CLIP's BPE; else a compact subset (DeCap.for_captions)
    encoder: str | None = None      # which encoder's text tower trained it (for error messages)
    # Where this shim differs from DeCap's code on purpose, each an option with DeCap's value one flag away:
    keep_end_on_truncate: bool = True  # DeCap cuts a long caption at 20 tokens, end token included (False)
    rewrite_text: bool = True       # join "9 6 %" into "96%"; DeCap scores the raw BPE decode (False)


def memory_weights(embeddings: torch.Tensor, memory: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """``softmax(e M^T / temperature)`` over the memory rows, for normalised e: [B, M], rows sum to 1."""
    e = F.normalize(embeddings.float(), dim=-1)
    return torch.softmax(e @ memory.T / temperature, dim=-1)


def project_to_memory(embeddings: torch.Tensor, memory: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """``normalise(softmax(e M^T / temperature) M)``: a convex combination of memory rows, renormalised.

    Low temperatures approach the nearest memory row; high ones approach the memory's mean direction.
    """
    return F.normalize(memory_weights(embeddings, memory, temperature) @ memory, dim=-1)


class DeCap(nn.Module):
    """Prefix map + GPT-2 over CLIP BPE + the memory bank. The CLIP encoder is passed in, never stored."""

    kind = "decap"

    def __init__(self, config: DeCapConfig, vocab_ids: torch.Tensor | None = None) -> None:
        """``vocab_ids``: the CLIP BPE ids the decoder may emit (sorted; see ``for_captions``); all by default."""
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.config = config
        self.tokenizer = ClipBPETokenizer()
        tok = self.tokenizer
        if vocab_ids is None:
            vocab_ids = torch.arange(config.vocab_size or tok.vocab_size)
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if config.vocab_size not in (None, len(vocab_ids)):
            raise ValueError(f"config.vocab_size {config.vocab_size} but {len(vocab_ids)} vocab_ids")
        # Decoder ids index this table of CLIP ids; 0 (pad) sorts first, start/end last.
        self.register_buffer("vocab_ids", vocab_ids)
        self._index_vocab()
        self.lm = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(vocab_ids), n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
            n_positions=1 + max(config.max_caption_tokens, config.max_tokens),
            bos_token_id=self.sot_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id))
        self.prefix_map = nn.Linear(config.embed_dim, config.n_embd)
        self.register_buffer("memory", torch.zeros(config.memory_size, config.embed_dim))

    @classmethod
    def for_captions(cls, config: DeCapConfig, captions: Sequence[str]) -> "DeCap":
        """A decoder whose output vocabulary is only the CLIP BPE ids these captions use.

        Same model otherwise; the output layer shrinks from 49,408 rows to the corpus' vocabulary,
        which makes CPU training practical on small corpora (FashionSynth uses a few hundred ids).
        """
        tok = ClipBPETokenizer()
        used = {tok.pad_id, tok.sot_id, tok.eos_id}
        for caption in captions:
            used.update(tok.encode(caption))
        config.vocab_size = len(used)
        return cls(config, torch.tensor(sorted(used)))

    def _index_vocab(self) -> None:
        tok = self.tokenizer
        self._to_decoder = {int(c): i for i, c in enumerate(self.vocab_ids.tolist())}
        missing = [name for name, i in (("pad", tok.pad_id), ("start", tok.sot_id), ("end", tok.eos_id))
                   if i not in self._to_decoder]
        if missing:
            raise ValueError(f"vocab_ids must contain the {', '.join(missing)} token id(s)")
        self.pad_id, self.sot_id, self.eos_id = (self._to_decoder[i] for i in (tok.pad_id, tok.sot_id, tok.eos_id))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self.vocab_ids[torch.as_tensor(ids, dtype=torch.long)].tolist(),
                                     rewrite=self.config.rewrite_text)

    @property
    def device(self) -> torch.device:
        return self.prefix_map.weight.device

    # -- memory bank ------------------------------------------------------------------------------
    def set_memory(self, text_embeddings: torch.Tensor) -> None:
        """Use these caption embeddings (normalised here) as the memory bank."""
        check_width(self.config.embed_dim, text_embeddings.shape[-1], self.config.encoder)
        self.memory = F.normalize(text_embeddings.float(), dim=-1).to(self.device)
        self.config.memory_size = len(self.memory)

    def project(self, embeddings: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        if len(self.memory) == 0:
            raise RuntimeError("the memory bank is empty: train_decap fills it, or call set_memory()")
        check_width(self.config.embed_dim, embeddings.shape[-1], self.config.encoder)
        return project_to_memory(embeddings.to(self.device), self.memory, temperature or self.config.temperature)

    # -- training ---------------------------------------------------------------------------------
    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Decoder ids of [start] + BPE + [end], at most ``max_caption_tokens``, padded: [N, T].

        A truncated caption keeps its end token, so decoding learns to stop where training text stopped;
        with ``keep_end_on_truncate=False`` it is cut at the limit as DeCap's training data is (the
        start token and the first ``max_caption_tokens - 1`` BPE tokens, no end token).
        """
        limit = self.config.max_caption_tokens
        ids = torch.full((len(captions), limit), self.pad_id, dtype=torch.long)
        for i, caption in enumerate(captions):
            bpe = self.tokenizer.encode(caption)
            cut = not self.config.keep_end_on_truncate and len(bpe) > limit - 2
            bpe = bpe[: limit - 1] if cut else bpe[: limit - 2]
            unknown = [t for t in bpe if t not in self._to_decoder]
            if unknown:
                raise ValueError(f"caption {i} uses {len(unknown)} BPE id(s) outside this decoder's vocabulary; "
                                 "build it with DeCap.for_captions on the training captions")
            row = [self.sot_id] + [self._to_decoder[t] for t in bpe] + ([] if cut else [self.eos_id])
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def forward(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits predicting ``ids[:, t]`` from [prefix, ids[:, :t]]: [B, T, V]."""
        check_width(self.config.embed_dim, embeddings.shape[-1], self.config.encoder)
        prefix = self.prefix_map(F.normalize(embeddings.float(), dim=-1))[:, None]
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(ids[:, :-1])], dim=1)
        return self.lm(inputs_embeds=inputs).logits

    def loss(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy; padding is ignored."""
        logits = self(embeddings, ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                               ignore_index=self.pad_id, label_smoothing=self.config.label_smoothing)

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, project: bool = True, method: str = "greedy",
                 max_tokens: int | None = None, temperature: float | None = None, beam_size: int = 5) -> list[str]:
        """Captions for CLIP embeddings [B, D]. ``project=True`` (for image embeddings) first maps them
        onto the memory bank; ``project=False`` decodes them as they are (text embeddings)."""
        was_training = self.training
        self.eval()
        try:
            e = self.project(embeddings, temperature) if project else embeddings.to(self.device)
            check_width(self.config.embed_dim, e.shape[-1], self.config.encoder)
            prefix = self.prefix_map(F.normalize(e.float(), dim=-1))[:, None]
            stop = {self.eos_id}
            max_tokens = max_tokens or self.config.max_tokens
            if method == "greedy":
                ids = greedy_decode(self.lm, prefix, max_tokens, stop)
            elif method == "beam":
                ids = beam_decode(self.lm, prefix, max_tokens, stop, beam_size)
            else:
                raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")
        finally:
            self.train(was_training)
        return [self.decode(row) for row in ids]

    def caption(self, encoder: ClipLike, images: torch.Tensor, batch_size: int = 64, **generate_kwargs) -> list[str]:
        """``encode_image`` -> normalise -> memory projection -> decoder, for preprocessed images."""
        out = []
        for start in range(0, len(images), batch_size):
            out += self.generate(embed_images(encoder, images[start:start + batch_size]), **generate_kwargs)
        return out

    # -- files ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """``model.safetensors`` (decoder, prefix map, memory bank) and ``config.json``."""
        return save_checkpoint(directory, self, {"kind": self.kind, "config": asdict(self.config),
                                                 "tokenizer": self.tokenizer.save(directory)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DeCap":
        saved = read_config(directory, cls.kind)
        model = cls(DeCapConfig(**saved["config"]), read_tensor(directory, "vocab_ids"))
        return load_weights(directory, model).to(map_location)  # the config sizes the memory buffer
