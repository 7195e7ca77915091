"""Decoder-side tokenizers: the small interface the captioners need, and three implementations.

- ``HFTokenizer`` wraps a transformers tokenizer (GPT-2's BPE for CapDec with pretrained GPT-2).
- ``ClipBPETokenizer`` is CLIP's BPE (open_clip ships its vocabulary, so it works offline); DeCap
  decodes into it.
- ``WordTokenizer`` is fitted on a corpus: a tiny vocabulary for CPU demos and tests.

A tokenizer saves itself into a checkpoint directory and ``load_tokenizer`` rebuilds it, so a
saved captioner is self-contained.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

from .checkpoint import read_json, write_json


class TextTokenizer(Protocol):
    vocab_size: int
    eos_id: int  # ends a caption; also used as padding (masked out of the loss)

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | Path) -> dict: ...


class HFTokenizer:
    """A transformers tokenizer, e.g. ``HFTokenizer.from_pretrained("gpt2")``."""

    kind = "hf"

    def __init__(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-text token")
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str = "gpt2") -> "HFTokenizer":
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(name_or_path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True).strip()

    def save(self, directory: str | Path) -> dict:
        self.tokenizer.save_pretrained(str(Path(directory) / "tokenizer"))
        return {"type": self.kind, "path": "tokenizer"}


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    """open_clip's BPE tables, read once per process (reading them takes about a second)."""
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


class ClipBPETokenizer:
    """CLIP's byte-pair encoding: start 49406, end 49407, pad 0 (DeCap's convention)."""

    kind = "clip_bpe"
    sot_id = 49406
    eos_id = 49407
    pad_id = 0

    def __init__(self) -> None:
        self._bpe = _clip_bpe()
        self.vocab_size = len(self._bpe.encoder)

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def decode(self, ids: Iterable[int], rewrite: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped). ``rewrite=False``: the BPE decode as it is, which is
        what DeCap's own code scores ("9 6 % cotton"), for BLEU comparable with its paper."""
        special = (self.sot_id, self.eos_id, self.pad_id)
        text = self._bpe.decode([int(i) for i in ids if int(i) not in special]).strip()
        if not rewrite:
            return text
        # CLIP's BPE splits every digit and mark into its own word ("9 6 % cotton , t - shirts"):
        # join digit runs and undo the spaces around common marks.
        text = re.sub(r"(?<=\d) (?=\d)", "", text)
        text = re.sub(r"\s+([.,;:!?%)])", r"\1", re.sub(r"\(\s+", "(", text))
        return re.sub(r"\s*([-'/])\s*", r"\1", text)

    def save(self, directory: str | Path) -> dict:
        return {"type": self.kind}


_PIECE = re.compile(r"(\s*)(\w+|[^\w\s])")
_SPACE = "\u2581"  # marks a piece that follows whitespace (SentencePiece's convention)


def _pieces(text: str) -> list[str]:
    """Words and punctuation marks, each remembering whether a space preceded it, so decoding
    gives back the text exactly (up to runs of whitespace): "96% cotton" stays "96% cotton"."""
    return [(_SPACE if space else "") + piece for space, piece in _PIECE.findall(text.strip())]


class WordTokenizer:
    """Words and punctuation marks of a corpus; id 0 ends a caption, id 1 is unknown."""

    kind = "word"
    eos_id = 0
    unk_id = 1

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = ["<eos>", "<unk>"] + [w for w in vocab if w not in ("<eos>", "<unk>")]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(p for text in texts for p in _pieces(text))
        return cls(sorted(p for p, c in counts.items() if c >= min_count))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(p, self.unk_id) for p in _pieces(text)]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = [self.vocab[i] for i in map(int, ids) if self.unk_id < i < self.vocab_size]
        return "".join(pieces).replace(_SPACE, " ").strip()

    def save(self, directory: str | Path) -> dict:
        write_json(Path(directory) / "tokenizer.json", {"vocab": self.vocab[2:]})
        return {"type": self.kind, "path": "tokenizer.json"}


def load_tokenizer(config: dict, directory: str | Path) -> TextTokenizer:
    """Rebuild the tokenizer a checkpoint was saved with (``config`` is what ``save`` returned)."""
    kind = config.get("type")
    if kind == HFTokenizer.kind:
        from transformers import AutoTokenizer
        return HFTokenizer(AutoTokenizer.from_pretrained(str(Path(directory) / config["path"])))
    if kind == ClipBPETokenizer.kind:
        return ClipBPETokenizer()
    if kind == WordTokenizer.kind:
        return WordTokenizer(read_json(Path(directory) / config["path"])["vocab"])
    raise ValueError(f"unknown tokenizer type {kind!r} in the checkpoint; pass tokenizer= explicitly")
