"""Pseudo-word injection into each family's text tower, and the Pic2Word mapping network."""
import pytest
import torch

from e2_adapter import get_backend
from e2_adapter.zoo import create_clip
from integrations.cir.pic2word import MapperConfig, PseudoWordMapper, check_compatible, train_mapper
from integrations.cir.text_injection import (encode_text, encode_text_with_pseudo_tokens, placeholder_positions,
                                             placeholder_token_id, token_width)

FAMILIES = ("open_clip", "openai", "hf")
PROMPTS = ["a photo of a red dress", "a photo of $ that is red", "$", "a photo of $ and $ again"]


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request):
    b = create_clip(request.param, "tiny", seed=0)
    b.model.eval()
    return b


def test_placeholder_is_one_token(bundle):
    pid = placeholder_token_id(bundle.tokenizer)
    assert pid == 259  # "$" in CLIP's BPE, as SEARLE uses it
    tokens = bundle.tokenizer(PROMPTS)
    assert placeholder_positions(tokens, pid).tolist() == [-1, 4, 1, 4]  # first "$" only
    with pytest.raises(ValueError, match="tokens"):
        placeholder_token_id(bundle.tokenizer, "photograph of")


@torch.no_grad()
def test_injection_leaves_ordinary_text_unchanged(bundle):
    model, tokens = bundle.model, bundle.tokenizer(PROMPTS)
    pid = placeholder_token_id(bundle.tokenizer)
    base = get_backend(model).encode_text(tokens)  # the library's text encoding of the family
    assert torch.equal(encode_text(model, tokens), base)
    if hasattr(model, "encode_text"):  # the family's own call agrees (the backend drops the padding)
        assert torch.allclose(model.encode_text(tokens), base, atol=1e-5)
    pseudo = torch.randn(len(PROMPTS), token_width(model))
    injected = encode_text_with_pseudo_tokens(model, tokens, pseudo, pid)
    assert torch.equal(injected[0], base[0])               # no placeholder: bit-for-bit the same
    assert (injected[1:] - base[1:]).abs().amax(dim=1).min() > 1e-3  # placeholder: a different embedding
    # Injecting the placeholder's own embedding reproduces ordinary encoding.
    table = get_backend(model).token_embedding()
    own = table.weight[pid].expand(len(PROMPTS), -1)
    assert torch.allclose(encode_text_with_pseudo_tokens(model, tokens, own, pid), base, atol=1e-5)
    # The hook is gone afterwards.
    assert torch.equal(encode_text(model, tokens), base)


def test_gradients_reach_the_pseudo_token_only(bundle):
    model, tokens = bundle.model, bundle.tokenizer(["a photo of $"])
    pseudo = torch.randn(1, token_width(model), requires_grad=True)
    encode_text_with_pseudo_tokens(model, tokens, pseudo, placeholder_token_id(bundle.tokenizer)).sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_width_mismatch_is_a_clear_error(bundle):
    tokens = bundle.tokenizer(["a photo of $"])
    with pytest.raises(ValueError, match="width"):
        encode_text_with_pseudo_tokens(bundle.model, tokens, torch.randn(1, 7), 259)
    with pytest.raises(ValueError, match="prompts"):
        encode_text_with_pseudo_tokens(bundle.model, tokens, torch.randn(2, token_width(bundle.model)), 259)
    mapper = PseudoWordMapper(MapperConfig(input_dim=64, output_dim=token_width(bundle.model) + 1, hidden_dim=16))
    with pytest.raises(ValueError, match="token width"):
        check_compatible(mapper, bundle.model)
    with pytest.raises(ValueError, match="image embeddings of width 64"):
        mapper(torch.randn(2, 32))


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="cannot inject"):
        token_width(torch.nn.Linear(2, 2))


def test_mapper_trains_and_round_trips(bundle, tmp_path):
    model = bundle.model
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embeddings = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    config = MapperConfig(input_dim=64, output_dim=token_width(model), hidden_dim=128, dropout=0.0)
    mapper, losses = train_mapper(model, bundle.tokenizer, embeddings, config, steps=12, batch_size=16, lr=3e-3)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3   # the Pic2Word loss falls
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # towers stay frozen
    assert [p.requires_grad for p in model.parameters()] == flags
    mapper.save(tmp_path / "phi")
    assert {p.name for p in (tmp_path / "phi").iterdir()} >= {"mapper.safetensors", "mapper_config.json"}
    loaded = PseudoWordMapper.load(tmp_path / "phi")
    assert loaded.config == mapper.config
    with torch.no_grad():
        assert torch.equal(loaded(embeddings[:4]), mapper(embeddings[:4]))
    with pytest.raises(FileNotFoundError, match="mapper weights"):
        PseudoWordMapper.load(tmp_path / "nowhere")


def test_mapper_seed_alone_decides_the_trained_mapper(bundle):
    """The global RNG state before the call (e.g. other models created first) must not change it."""
    embeddings = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    config = MapperConfig(input_dim=64, output_dim=token_width(bundle.model), hidden_dim=32)
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        mapper, _ = train_mapper(bundle.model, bundle.tokenizer, embeddings, config, steps=2, batch_size=16, seed=seed)
        runs.append(mapper.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    assert not all(torch.equal(v, runs[2][k]) for k, v in runs[0].items())


def test_mapper_config_validates_prompts():
    with pytest.raises(ValueError, match="placeholder"):
        MapperConfig(64, 64, train_prompt="a photo of")
    with pytest.raises(ValueError, match="modification"):
        MapperConfig(64, 64, query_prompt="a photo of $")
    layers = PseudoWordMapper(MapperConfig(64, 32, hidden_dim=128)).layers
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Dropout"] * 2 + ["Linear"]
