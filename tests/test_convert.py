"""Original checkpoints into the shims. Each original's trained part is re-declared here at tiny size,
from the module names and shapes its published code uses (no code of theirs), saved as its training
script saves it, converted, and shown to compute what the original computes."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from integrations.convert import (OriginalCheckpointError, capdec_from_original, decap_from_original,
                                  mapper_from_pic2word, mapper_from_searle)

CLIP_VOCAB, SOT, EOT = 49408, 49406, 49407


def gpt2(vocab, width=32, layers=2, heads=4, positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads,
                                      n_positions=positions)).eval()


def perturb(module, seed=1, scale=0.05):
    """Off the init (GPT-2 starts its biases at zero), so a converter dropping a tensor cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# --- DeCap (dhg-wei/DeCap train.py: DeCap.decoder = GPT2LMHeadModel over CLIP BPE ids,
#     DeCap.clip_project = MLP((512, width)) whose only layer is model.0) ------------------------------

class OriginalDeCapLayout(nn.Module):
    def __init__(self, embed_dim=16, width=32):
        super().__init__()
        self.decoder = gpt2(CLIP_VOCAB, width)
        self.clip_project = nn.Module()
        self.clip_project.model = nn.Sequential(nn.Linear(embed_dim, width))

    def forward(self, features, tokens):  # the prefix, then the caption's CLIP tokens
        prefix = self.clip_project.model(features)[:, None]
        return self.decoder(inputs_embeds=torch.cat([prefix, self.decoder.transformer.wte(tokens)], 1)).logits

    @torch.no_grad()
    def greedy(self, feature, steps=30):
        """DeCap's notebook decoding: argmax from the prefix, until the end token, at most 30 tokens."""
        inputs, out = self.clip_project.model(feature)[None, None], []
        for _ in range(steps):
            token = self.decoder(inputs_embeds=inputs).logits[0, -1].argmax()
            out.append(int(token))
            if token == EOT:
                break
            inputs = torch.cat([inputs, self.decoder.transformer.wte(token)[None, None]], 1)
        return out


def decap_tokens(n=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = 4 + 3 * i
        tokens[i, 0], tokens[i, 1:k + 1], tokens[i, k + 1] = SOT, torch.randint(300, 400, (k,), generator=g), EOT
    return tokens


def test_decap_decoder_converts_and_reproduces_its_logits_and_greedy_captions(tmp_path, one_thread):
    original = perturb(OriginalDeCapLayout()).eval()
    path = tmp_path / "coco_prefix-009.pt"
    torch.save(original.state_dict(), path)  # what DeCap's train.py writes
    features = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    tokens = decap_tokens()

    shim = decap_from_original(path, n_head=4)
    assert shim.lm.config.n_positions == 31 and shim.lm.transformer.wpe.weight.shape[0] == 31  # 64 rows cut
    with torch.no_grad():
        expected = original(features, tokens)[:, :-1]  # DeCap's loss: logits[:, :-1] against the tokens
        assert torch.allclose(shim(features, tokens), expected, atol=1e-5)
        for i in range(3):
            ids = original.greedy(features[i])
            assert shim.generate(features[i:i + 1], project=False, method="greedy")[0] == shim.decode(ids)

    # a vocabulary slice: the same logits on the kept rows
    keep = torch.unique(torch.cat([tokens.flatten(), torch.arange(0, 1000, 7), torch.tensor([0, SOT, EOT])]))
    small = decap_from_original(path, n_head=4, vocab_ids=keep)
    assert small.lm.transformer.wte.weight.shape[0] == len(keep)
    with torch.no_grad():
        decoder_ids = torch.searchsorted(keep, tokens)  # the shim's ids index its table of CLIP ids
        assert torch.allclose(small(features, decoder_ids), expected[..., keep], atol=1e-5)


def test_decap_converter_refuses_what_is_not_a_decap_checkpoint(tmp_path):
    with pytest.raises(OriginalCheckpointError, match="not a DeCap checkpoint"):
        decap_from_original({"clip_project.weight": torch.zeros(2, 2)})
    path = tmp_path / "with_code.pt"
    torch.save({"args": argparse.Namespace(lr=1), "model": {}}, path)  # unpickling would build an object
    with pytest.raises(OriginalCheckpointError, match="would run code"):
        decap_from_original(path)
    with pytest.raises(FileNotFoundError):
        decap_from_original(tmp_path / "missing.pt")


# --- CapDec (DavidHuji/CapDec train.py: ClipCaptionModel.gpt + clip_project, an MLP (Tanh between
#     Linear layers, model.0 / model.2) or a TransformerMapper: linear, prefix_const and
#     transformer.layers[i] = pre-norm (norm1, attn, norm2, mlp) with attention projections
#     to_queries / to_keys_values (no bias) / project, MLP fc1 -> ReLU -> fc2 of ratio 2, 8 heads) ----

class OriginalCapDecAttention(nn.Module):
    def __init__(self, dim, heads=8):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).view(b, n, h, c // h)
        k, v = self.to_keys_values(x).view(b, n, 2, h, c // h).unbind(2)
        weights = (torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // h) ** -0.5).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", weights, v).reshape(b, n, c))


class OriginalCapDecLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = OriginalCapDecAttention(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.relu(self.mlp.fc1(self.norm2(x))))


class OriginalCapDecLayout(nn.Module):
    def __init__(self, mapping, embed_dim=16, width=32, prefix_length=4, clip_length=3, layers=2, vocab=60):
        super().__init__()
        self.prefix_length, self.width, self.mapping = prefix_length, width, mapping
        self.gpt = gpt2(vocab, width, layers=1, heads=2)
        self.clip_project = nn.Module()
        if mapping == "mlp":
            out = width * prefix_length
            self.clip_project.model = nn.Sequential(nn.Linear(embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))
        else:
            self.clip_length = clip_length
            self.clip_project.linear = nn.Linear(embed_dim, clip_length * width)
            self.clip_project.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
            self.clip_project.transformer = nn.Module()
            self.clip_project.transformer.layers = nn.ModuleList(OriginalCapDecLayer(width) for _ in range(layers))

    def prefix(self, embeddings):
        if self.mapping == "mlp":
            return self.clip_project.model(embeddings).view(-1, self.prefix_length, self.width)
        x = self.clip_project.linear(embeddings).view(len(embeddings), self.clip_length, -1)
        x = torch.cat([x, self.clip_project.prefix_const.expand(len(embeddings), -1, -1)], 1)
        for layer in self.clip_project.transformer.layers:
            x = layer(x)
        return x[:, self.clip_length:]

    def forward(self, tokens, embeddings, mask):  # CapDec's loss reads logits[:, prefix_length - 1: -1]
        inputs = torch.cat([self.prefix(embeddings), self.gpt.transformer.wte(tokens)], 1)
        return self.gpt(inputs_embeds=inputs, attention_mask=mask).logits[:, self.prefix_length - 1: -1]


@pytest.mark.parametrize("mapping", ("mlp", "transformer"))
def test_capdec_checkpoint_converts_and_reproduces_its_logits(mapping, tmp_path, one_thread):
    from integrations.captioning import WordTokenizer
    original = perturb(OriginalCapDecLayout(mapping)).eval()
    path = tmp_path / "coco_prefix-009.pt"
    torch.save(original.state_dict(), path)
    tokenizer = WordTokenizer.fit(["a red bag .", "a blue long dress .", "white shoes ."])

    shim = capdec_from_original(path, tokenizer, n_head=2)
    assert shim.config.mapping == mapping and shim.config.prefix_length == 4
    if mapping == "transformer":
        assert shim.config.clip_length == 3 and shim.config.mapper_layers == 2
        assert torch.equal(shim.mapper.transformer.layers[0].self_attn.in_proj_bias, torch.zeros(96))
    embeddings = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    ids, mask = shim.encode_captions(["a red bag .", "white shoes .", "a blue long dress ."])
    prefix_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        assert torch.allclose(shim.prefix(embeddings), original.prefix(embeddings), atol=1e-5)
        assert torch.allclose(shim(embeddings, ids, mask), original(ids, embeddings, prefix_mask), atol=1e-5)


# --- SEARLE (miccunifi/SEARLE phi.py: Phi.layers = Linear, GELU, Dropout, Linear, GELU, Dropout, Linear;
#     released as {"Phi": state_dict}) -----------------------------------------------------------------

def test_searle_phi_converts_and_reproduces_its_outputs(tmp_path):
    torch.manual_seed(0)
    phi = nn.Module()
    phi.layers = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 64), nn.GELU(),
                               nn.Dropout(0.5), nn.Linear(64, 24))
    phi.eval()
    torch.save({"Phi": phi.state_dict()}, tmp_path / "SEARLE_tiny.pt")
    mapper = mapper_from_searle(tmp_path / "SEARLE_tiny.pt")
    assert (mapper.config.hidden_dim, mapper.config.hidden_layers, mapper.config.activation) == (64, 2, "gelu")
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(mapper(x), phi.layers(x), atol=1e-6)


# --- Pic2Word (google-research/composed_image_retrieval model/model.py: IM2TEXT.layers[i] =
#     Sequential(Linear, Dropout, ReLU), then fc_out; saved by its trainer under state_dict_img2text,
#     from a DataParallel/DDP model, so with the module. prefix) --------------------------------------

class OriginalIM2TEXTLayout(nn.Module):
    def __init__(self, embed_dim=16, middle_dim=32, output_dim=24, n_layer=2, dropout=0.1):
        super().__init__()
        self.fc_out = nn.Linear(middle_dim, output_dim)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(embed_dim if i == 0 else middle_dim, middle_dim),
                                                    nn.Dropout(dropout), nn.ReLU()) for i in range(n_layer)])

    def forward(self, x):
        return self.fc_out(self.layers(x))


def test_pic2word_im2text_converts_as_the_relu_variant_and_reproduces_its_outputs(tmp_path):
    torch.manual_seed(0)
    original = OriginalIM2TEXTLayout()
    torch.save({"epoch": 3, "name": "pic2word", "state_dict": {},
                "state_dict_img2text": {f"module.{k}": v for k, v in original.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    mapper = mapper_from_pic2word(tmp_path / "epoch_3.pt")
    assert (mapper.config.activation, mapper.config.dropout, mapper.config.hidden_dim) == ("relu", 0.1, 32)
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.allclose(mapper(x), original.eval()(x), atol=1e-6)
        # in training too: dropout before or after the ReLU is the same function, mask for mask
        original.train(), mapper.train()
        torch.manual_seed(5)
        a = original(x)
        torch.manual_seed(5)
        assert torch.allclose(mapper(x), a, atol=1e-6)


def test_searle_training_checkpoint_with_its_path_entry_loads(tmp_path):
    """SEARLE's save_checkpoint stores its training folder as a pathlib.Path beside the weights."""
    phi = nn.Module()
    phi.layers = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 8))
    torch.save({"epoch": 2, "Phi": phi.state_dict(), "training_path": tmp_path / "run"}, tmp_path / "ckpt.pt")
    mapper = mapper_from_searle(tmp_path / "ckpt.pt")
    assert mapper.config.hidden_layers == 1
    with torch.no_grad():
        x = torch.randn(3, 8)
        assert torch.allclose(mapper(x), phi.eval().layers(x), atol=1e-6)


def test_mapper_converters_name_a_wrong_file():
    with pytest.raises(OriginalCheckpointError, match="not a Pic2Word IM2TEXT"):
        mapper_from_pic2word({"layers.0.weight": torch.zeros(2, 2)})
    with pytest.raises(OriginalCheckpointError, match="not a SEARLE Phi"):
        mapper_from_searle({"fc_out.weight": torch.zeros(2, 2)})


# --- options that give the originals' behaviour ---------------------------------------------------

def test_decap_truncation_and_raw_decode_options_match_decap(one_thread):
    from integrations.decap import DeCap, DeCapConfig
    long = " ".join(["red"] * 30)
    ours = DeCap(DeCapConfig(embed_dim=8, n_layer=1, n_head=2, n_embd=16))
    theirs = DeCap(DeCapConfig(embed_dim=8, n_layer=1, n_head=2, n_embd=16, keep_end_on_truncate=False,
                               rewrite_text=False))
    a, b = ours.encode_captions([long, "a bag"]), theirs.encode_captions([long, "a bag"])
    assert a[0, -1] == ours.eos_id and b[0, -1] != theirs.eos_id  # DeCap cuts the end token of long captions
    assert torch.equal(a[1], b[1])  # short captions are the same
    bpe = ours.tokenizer.encode(long)
    assert b[0, 1:].tolist() == [theirs._to_decoder[t] for t in bpe[:19]]  # clip.tokenize(...)[:20]
    pct = [ours._to_decoder[t] for t in ours.tokenizer.encode("96% cotton")]
    assert ours.decode(pct) == "96% cotton" and theirs.decode(pct) == "9 6 % cotton"


def test_capdec_uniform_noise_and_modality_offset():
    from integrations.capdec import inject_noise
    x = torch.randn(2000, 16)
    g = torch.Generator().manual_seed(0)
    ball = inject_noise(x, 0.016, generator=g, renormalize=False, uniform=True) - F.normalize(x, dim=-1)
    radius = ball.norm(dim=-1)
    assert radius.max() <= 0.016 ** 0.5 + 1e-6 and radius.min() > 0.5 * 0.016 ** 0.5  # in the ball, mostly near its edge
    offset = torch.full((16,), 0.1)
    moved = inject_noise(x, 0.0, renormalize=False, modality_offset=offset)
    assert torch.allclose(moved, F.normalize(x, dim=-1) + offset)


def test_pic2word_mapper_trains_with_pic2word_weight_decay(monkeypatch):
    from integrations.cir import pic2word
    seen = {}

    def spy(params, **kw):
        seen.update(kw)
        raise RuntimeError("stop")
    monkeypatch.setattr(pic2word.torch.optim, "AdamW", spy)
    model = __import__("conftest").make_tiny("open_clip")
    from e2_adapter.zoo import create_clip
    tok = create_clip("open_clip", "tiny").tokenizer
    for activation, decay in (("relu", 0.1), ("gelu", 0.01)):
        cfg = pic2word.MapperConfig(input_dim=model.visual.proj.shape[1], output_dim=model.token_embedding.embedding_dim,
                                    hidden_dim=8, activation=activation)
        with pytest.raises(RuntimeError, match="stop"):
            pic2word.train_mapper(model, tok, torch.randn(4, cfg.input_dim), cfg, steps=1)
        assert seen["weight_decay"] == decay
