"""peft LoRA stacks with E2 in both orders, and both kinds of new parameters train."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

import e2_adapter

LORA = dict(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"])


def train_steps(model, images, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(images.shape[0], 64)
    losses = []
    for _ in range(steps):
        out = e2_adapter.encode_image_regions(model, images)
        loss = (out.image - target).pow(2).mean() + sum((v - target).pow(2).mean() for v in out.regions.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("order", ["lora_then_e2", "e2_then_lora"])
def test_lora_and_e2_train_together(order, images, make_tiny):
    model = make_tiny("open_clip").train()
    if order == "lora_then_e2":
        model = e2_adapter.wrap(get_peft_model(model, LoraConfig(**LORA)))
    else:
        model = get_peft_model(e2_adapter.wrap(model), LoraConfig(**LORA))
        e2_adapter.get_adapter(model).requires_grad_(True)  # peft froze everything but LoRA
    assert e2_adapter.is_wrapped(model)
    lora_before = lora_weights(model)
    tokens_before = e2_adapter.get_adapter(model).tokens.detach().clone()
    losses = train_steps(model, images)
    assert losses[-1] < losses[0]
    assert lora_before and any(not torch.equal(v, lora_weights(model)[n]) for n, v in lora_before.items())
    assert not torch.equal(tokens_before, e2_adapter.get_adapter(model).tokens)


@pytest.mark.parametrize("target", ["key", "query", "value"])
def test_lora_on_a_fusion_projection_is_not_bypassed(target, images, make_tiny):
    """The fusion block folds q.k^T through key.weight for speed; a LoRA layer on ``key`` (or on the
    query / value projections) must still change what the model computes, not be silently skipped."""
    model = e2_adapter.wrap(make_tiny("open_clip"), preset="faithful").eval()
    with torch.no_grad():
        plain = e2_adapter.encode_image_regions(model, images)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    fusion = e2_adapter.get_adapter(model).fusions[0]
    assert type(getattr(fusion, target)) is not torch.nn.Linear  # peft replaced it
    with torch.no_grad():
        same = e2_adapter.encode_image_regions(model, images)  # lora_B starts at zero: same function
        assert torch.equal(same.selections, plain.selections)
        assert torch.allclose(same.image, plain.image, atol=1e-5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1.0)
        moved = e2_adapter.encode_image_regions(model, images)
    changed = not torch.equal(moved.selections, plain.selections) if target != "value" else \
        not torch.allclose(moved.image, plain.image, atol=1e-4)
    assert changed, f"a LoRA on the fusion {target} did not change the output"


def test_hook_on_the_fusion_key_is_honoured(images, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"), preset="faithful").eval()
    key = e2_adapter.get_adapter(model).fusions[0].key
    with torch.no_grad():
        before = e2_adapter.encode_image_regions(model, images).selections
        handle = key.register_forward_hook(lambda m, args, out: -out)  # reverses every score
        flipped = e2_adapter.encode_image_regions(model, images).selections
        handle.remove()
        after = e2_adapter.encode_image_regions(model, images).selections
    assert not torch.equal(flipped[:, 0], before[:, 0]) and torch.equal(after, before)
