"""Load a part trained with an original pipeline's own code into this project's shim, so a user keeps
their trained decoder / mapper and swaps only the CLIP encoder.

    decap = decap_from_original("coco_prefix-009.pt")                      # DeCap's train.py output
    capdec = capdec_from_original("coco_prefix-009.pt", tokenizer)         # CapDec (ClipCap) train.py
    phi = mapper_from_searle("SEARLE_ViTB32.pt")                           # SEARLE's {"Phi": ...}
    phi = mapper_from_pic2word("pic2word_model.pt")                        # Pic2Word's state_dict_img2text

Each accepts a path (read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
code) or a state dict already in memory. Sizes are read from the weights; what the weights do not say
(attention heads) is an argument with the original's default. What each converter changes:

- DeCap: ``decoder.*`` -> ``lm.*``, ``clip_project.model.0`` -> ``prefix_map``; the position table is
  cut to the shim's ``1 + max(max_caption_tokens, max_tokens)`` rows; with ``vocab_ids`` the token table
  and output layer keep only those CLIP BPE rows (the decoder then cannot emit other ids).
- CapDec: ``gpt.*`` -> ``lm.*``; the MLP mapper's ``clip_project.model.{0,2}`` -> ``mapper.net.{0,2}``;
  the transformer mapper's own attention (queries, and keys+values stacked in one projection, no
  biases) -> ``nn.MultiheadAttention``'s packed ``in_proj`` with zero q/k/v biases, its MLP
  ``fc1``/``fc2`` -> ``linear1``/``linear2``, ``linear`` -> ``expand``, ``prefix_const`` -> ``constants``.
- SEARLE's ``Phi``: same layout and keys as the shim's mapper (Linear-GELU-Dropout x 2, Linear).
- Pic2Word's ``IM2TEXT``: ``layers.{i}.0`` -> ``layers.{3i}``, ``fc_out`` -> the last Linear, with the
  ReLU variant (``activation="relu"``, dropout 0.1); DataParallel's ``module.`` prefix is dropped.

GPT-2 buffers older transformers saved in state dicts (``attn.bias``, ``attn.masked_bias``: the causal
mask) are dropped. DeCap's ``decoder_config.pkl`` is a pickle, not read here: its GPT-2 is taken to be
the default ``GPT2Config`` apart from the sizes in the weights (``n_head`` is not in them: DeCap uses 4).
"""
from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch


class OriginalCheckpointError(ValueError):
    """A file or state dict is not the original pipeline's checkpoint this converter reads."""


def read_state(source, keys: tuple[str, ...] = (), what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a path or a dict; the first of ``keys`` present is unpacked (a training
    checkpoint holding several), and a DataParallel ``module.`` prefix is dropped."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            # pathlib paths only (SEARLE's save_checkpoint stores its training folder); nothing that runs code
            with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                                                   pathlib.PureWindowsPath]):
                source = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise OriginalCheckpointError(
                f"{path} holds more than tensors and plain containers (it would run code to load), so it is "
                f"not read; re-save its state dict with torch.save(model.state_dict(), ...) ({exc})") from None
    if not isinstance(source, Mapping):
        raise OriginalCheckpointError(f"the {what} is a {type(source).__name__}, not a state dict")
    for key in keys:
        if isinstance(source.get(key), Mapping):
            source = source[key]
            break
    state = {}
    for name, value in source.items():
        if not isinstance(value, torch.Tensor):
            raise OriginalCheckpointError(f"the {what} has a non-tensor entry {name!r}: expected a state dict"
                                          + (f" (or a dict with one of {list(keys)})" if keys else ""))
        state[name[len("module."):] if name.startswith("module.") else name] = value
    return state


def _need(state: dict, names, what: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise OriginalCheckpointError(f"not a {what} checkpoint: it lacks {missing[:4]} (has {sorted(state)[:6]}...)")


def _gpt2_part(state: dict, prefix: str) -> dict:
    """The GPT2LMHeadModel entries under ``prefix``, without the causal-mask buffers."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not re.search(r"\.attn\.(masked_)?bias$", k)}


def _gpt2_config(lm: dict, n_head: int, what: str, n_positions: int | None = None):
    from transformers import GPT2Config
    _need(lm, ["transformer.wte.weight", "transformer.wpe.weight"], what)
    vocab, width = lm["transformer.wte.weight"].shape
    layers = len({int(m.group(1)) for k in lm if (m := re.match(r"transformer\.h\.(\d+)\.", k))})
    if width % n_head:
        raise OriginalCheckpointError(f"n_head={n_head} does not divide the {what} GPT-2 width {width}")
    return GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=n_head,
                      n_positions=n_positions or lm["transformer.wpe.weight"].shape[0])


# -- DeCap --------------------------------------------------------------------------------------------

def decap_from_original(source, n_head: int = 4, vocab_ids=None, memory: torch.Tensor | None = None,
                        **config):
    """A ``DeCap`` shim holding a decoder trained by DeCap's ``train.py`` (``{prefix}-{epoch}.pt``).

    ``vocab_ids``: CLIP BPE ids to keep (sorted; pad, start and end included), e.g. those of your
    captions, for a smaller output layer; default all 49,408. ``memory``: caption embeddings for the
    memory bank (``set_memory``). Other keywords are ``DeCapConfig`` fields (``max_caption_tokens``,
    ``max_tokens``, ``temperature``, ...)."""
    from integrations.decap.model import DeCap, DeCapConfig
    state = read_state(source, what="DeCap")
    _need(state, ["clip_project.model.0.weight", "decoder.transformer.wte.weight"], "DeCap")
    lm = _gpt2_part(state, "decoder.")
    gpt2 = _gpt2_config(lm, n_head, "DeCap")
    if gpt2.vocab_size != 49408:
        raise OriginalCheckpointError(f"the DeCap decoder has {gpt2.vocab_size} token rows; DeCap decodes CLIP's "
                                      "49,408 BPE ids")
    width, embed_dim = state["clip_project.model.0.weight"].shape
    cfg = DeCapConfig(embed_dim=embed_dim, n_layer=gpt2.n_layer, n_head=n_head, n_embd=width, **config)
    ids = torch.arange(gpt2.vocab_size) if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long)
    if vocab_ids is not None:
        cfg.vocab_size = len(ids)
        if not torch.all(ids[1:] > ids[:-1]) or ids.min() < 0 or ids.max() >= gpt2.vocab_size:
            raise ValueError("vocab_ids must be sorted distinct CLIP BPE ids below 49408")
    positions = 1 + max(cfg.max_caption_tokens, cfg.max_tokens)
    if lm["transformer.wpe.weight"].shape[0] < positions:
        raise OriginalCheckpointError(f"the DeCap decoder has {lm['transformer.wpe.weight'].shape[0]} positions; "
                                      f"the shim needs {positions} (lower max_tokens / max_caption_tokens)")
    lm["transformer.wpe.weight"] = lm["transformer.wpe.weight"][:positions]
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in lm:
            lm[key] = lm[key][ids]
    lm.setdefault("lm_head.weight", lm["transformer.wte.weight"])  # tied to the token table
    model = DeCap(cfg, ids)
    converted = {f"lm.{k}": v for k, v in lm.items()}
    converted["prefix_map.weight"] = state["clip_project.model.0.weight"]
    converted["prefix_map.bias"] = state["clip_project.model.0.bias"]
    converted["memory"] = model.memory
    converted["vocab_ids"] = model.vocab_ids
    _load(model, converted, "DeCap")
    if memory is not None:
        model.set_memory(memory)
    return model.eval()


# -- CapDec -------------------------------------------------------------------------------------------

def capdec_from_original(source, tokenizer, n_head: int = 12, mapper_heads: int = 8, **config):
    """A ``CapDec`` shim holding a mapper + GPT-2 trained by CapDec's (ClipCap's) ``train.py``.

    ``tokenizer``: the GPT-2 tokenizer the model was trained with (``HFTokenizer.from_pretrained("gpt2")``).
    ``n_head``: GPT-2's heads (12 for "gpt2"); ``mapper_heads``: the transformer mapper's (CapDec: 8).
    The mapping type, prefix length, clip length and mapper depth are read from the weights; other
    keywords are ``CapDecConfig`` fields (``stop_token``, ``beam_size``, ``noise_variance``, ...)."""
    from transformers import GPT2LMHeadModel
    from integrations.capdec.model import CapDec, CapDecConfig
    state = read_state(source, what="CapDec")
    _need(state, ["gpt.transformer.wte.weight"], "CapDec")
    lm = _gpt2_part(state, "gpt.")
    gpt2 = _gpt2_config(lm, n_head, "CapDec")
    width = gpt2.n_embd
    converted = {f"lm.{k}": v for k, v in lm.items()}
    converted.setdefault("lm.lm_head.weight", lm["transformer.wte.weight"])
    if "clip_project.model.0.weight" in state:
        out, embed_dim = state["clip_project.model.2.weight"].shape[0], state["clip_project.model.0.weight"].shape[1]
        if out % width:
            raise OriginalCheckpointError(f"the MLP mapper's output {out} is not a multiple of GPT-2's width {width}")
        cfg = CapDecConfig(embed_dim=embed_dim, mapping="mlp", prefix_length=out // width, **config)
        for i in (0, 2):
            for p in ("weight", "bias"):
                converted[f"mapper.net.{i}.{p}"] = state[f"clip_project.model.{i}.{p}"]
    else:
        _need(state, ["clip_project.linear.weight", "clip_project.prefix_const"], "CapDec")
        expand = state["clip_project.linear.weight"]
        layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))})
        cfg = CapDecConfig(embed_dim=expand.shape[1], mapping="transformer",
                           prefix_length=state["clip_project.prefix_const"].shape[0],
                           clip_length=expand.shape[0] // width, mapper_layers=len(layers),
                           mapper_heads=mapper_heads, **config)
        converted["mapper.expand.weight"], converted["mapper.expand.bias"] = expand, state["clip_project.linear.bias"]
        converted["mapper.constants"] = state["clip_project.prefix_const"]
        for i in layers:
            src, dst = f"clip_project.transformer.layers.{i}.", f"mapper.transformer.layers.{i}."
            q, kv = state[src + "attn.to_queries.weight"], state[src + "attn.to_keys_values.weight"]
            if kv.shape[0] != 2 * q.shape[0]:
                raise OriginalCheckpointError(f"mapper layer {i} attends to another width (a cross-attention "
                                              "layer); only CapDec's self-attention mapper converts")
            converted[dst + "self_attn.in_proj_weight"] = torch.cat([q, kv])  # rows: queries, keys, values
            q_bias = state.get(src + "attn.to_queries.bias", torch.zeros(q.shape[0]))
            kv_bias = state.get(src + "attn.to_keys_values.bias", torch.zeros(kv.shape[0]))
            converted[dst + "self_attn.in_proj_bias"] = torch.cat([q_bias, kv_bias])  # CapDec: no biases
            for theirs, ours in (("attn.project", "self_attn.out_proj"), ("mlp.fc1", "linear1"),
                                 ("mlp.fc2", "linear2"), ("norm1", "norm1"), ("norm2", "norm2")):
                for p in ("weight", "bias"):
                    converted[f"{dst}{ours}.{p}"] = state[f"{src}{theirs}.{p}"]
    model = CapDec(cfg, GPT2LMHeadModel(gpt2), tokenizer)
    _load(model, converted, "CapDec")
    return model.eval()


# -- SEARLE / Pic2Word mappers ------------------------------------------------------------------------

def mapper_from_searle(source, dropout: float = 0.5, **config):
    """The shim's ``PseudoWordMapper`` holding SEARLE's ``Phi`` (a ``{"Phi": state}`` file or the state)."""
    from integrations.cir.pic2word import MapperConfig, PseudoWordMapper
    state = read_state(source, keys=("Phi",), what="SEARLE Phi")
    linears = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.weight$", k))})
    if not linears or linears != list(range(0, 3 * len(linears), 3)):
        raise OriginalCheckpointError(f"not a SEARLE Phi: expected Linear layers at layers.0, .3, .6, ...; "
                                      f"has {sorted(state)[:6]}")
    first, last = state["layers.0.weight"], state[f"layers.{linears[-1]}.weight"]
    cfg = MapperConfig.for_style("searle", input_dim=first.shape[1], output_dim=last.shape[0],  # SEARLE's "$" prompts
                                 hidden_dim=first.shape[0], hidden_layers=len(linears) - 1, dropout=dropout,
                                 activation="gelu", **config)
    mapper = PseudoWordMapper(cfg)
    _load(mapper, state, "SEARLE Phi")
    return mapper.eval()


def mapper_from_pic2word(source, dropout: float = 0.1, **config):
    """The shim's ``PseudoWordMapper``, ReLU variant, holding Pic2Word's ``IM2TEXT`` (its training
    checkpoint's ``state_dict_img2text``, or that state dict)."""
    from integrations.cir.pic2word import MapperConfig, PseudoWordMapper
    state = read_state(source, keys=("state_dict_img2text",), what="Pic2Word IM2TEXT")
    _need(state, ["fc_out.weight", "fc_out.bias"], "Pic2Word IM2TEXT")
    hidden = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.0\.weight$", k))})
    if hidden != list(range(len(hidden))):
        raise OriginalCheckpointError(f"not a Pic2Word IM2TEXT: hidden Linear layers at {hidden}")
    first = state["layers.0.0.weight"] if hidden else state["fc_out.weight"]
    cfg = MapperConfig(input_dim=first.shape[1], output_dim=state["fc_out.weight"].shape[0],
                       hidden_dim=state["fc_out.weight"].shape[1], hidden_layers=len(hidden), dropout=dropout,
                       activation="relu", **config)
    converted = {}
    for i in hidden:
        for p in ("weight", "bias"):
            converted[f"layers.{3 * i}.{p}"] = state[f"layers.{i}.0.{p}"]
    for p in ("weight", "bias"):
        converted[f"layers.{3 * len(hidden)}.{p}"] = state[f"fc_out.{p}"]
    mapper = PseudoWordMapper(cfg)
    _load(mapper, converted, "Pic2Word IM2TEXT")
    return mapper.eval()


def _load(model: torch.nn.Module, state: dict, what: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise OriginalCheckpointError(f"the {what} checkpoint does not convert cleanly: missing {missing[:4]}, "
                                      f"unexpected {unexpected[:4]}, shapes differ for {bad[:4]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
