import math

import pytest
import torch
import torch.nn.functional as F

from e2_adapter.losses import clip_loss, deduplicate, e2_loss, region_loss


def test_deduplicate_keeps_first_seen_order():
    values, ids = deduplicate(["Gucci", "Prada", "Gucci", "Acne"])
    assert values == ["Gucci", "Prada", "Acne"] and ids.tolist() == [0, 1, 0, 2]


def test_clip_loss_perfect_alignment_is_near_zero_and_random_is_log_b():
    big = torch.tensor(math.log(1000.0))
    assert clip_loss(torch.eye(8), torch.eye(8), big) < 1e-3
    same = torch.ones(8, 16)
    assert abs(clip_loss(same, same, big).item() - math.log(8)) < 1e-4


def test_repeated_tags_are_not_negatives_of_each_other():
    """Two images of one brand: with deduplicated multi-positive targets a perfect model has ~0 loss;
    the naive per-row InfoNCE would punish it with ~log 2 for the duplicate."""
    values = torch.eye(3)
    regions = values[[0, 0, 1, 2]]  # images 0 and 1 carry the same value
    _, ids = deduplicate(["a", "a", "b", "c"])
    scale = torch.tensor(math.log(1000.0))
    assert region_loss(regions, ids, values, scale) < 1e-3
    all_same = region_loss(values[[0, 0]], torch.tensor([0, 0]), values[:1], scale)
    assert torch.isfinite(all_same) and all_same < 1e-3  # no negatives at all: nothing to push apart
    naive_text = values[[0, 0, 1, 2]]
    assert clip_loss(regions, naive_text, scale) > 0.3


def test_e2_loss_weights_global_and_mean_region():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    regions = {"brand": torch.randn(4, 8), "season": torch.randn(4, 8)}
    ids = {"brand": torch.tensor([0, 1, 0, 1]), "season": torch.tensor([0, 1, 2, 3])}
    tag_text = {"brand": torch.randn(2, 8), "season": torch.randn(4, 8)}
    scale = torch.tensor(2.0)
    out = e2_loss(img, txt, regions, ids, tag_text, scale, 0.5, 0.5)
    expected = 0.5 * out["global"] + 0.5 * (out["region/brand"] + out["region/season"]) / 2
    assert torch.allclose(out["loss"], expected)
    only_global = e2_loss(img, txt, regions, ids, tag_text, scale, 1.0, 0.0)
    assert torch.allclose(only_global["loss"], out["global"])


def test_region_loss_is_zero_with_zero_gradient_when_one_value_covers_the_batch():
    """One value carried by every image: no negatives either way, so nothing to learn. The loss and
    its gradient are exactly zero (a -inf mask would make the gradient NaN instead)."""
    region = torch.randn(3, 4, requires_grad=True)
    loss = region_loss(region, torch.tensor([0, 0, 0]), torch.randn(1, 4), torch.tensor(2.0))
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert torch.equal(region.grad, torch.zeros_like(region))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_loss_is_fp32_inside_autocast(dtype):
    """AMP training calls the losses inside torch.autocast with half-precision embeddings. Found on a GPU:
    fp16 autocast made the region logits fp16 and the -1e9 mask overflowed (every E2 run under fp16 AMP
    crashed). Every loss, and every multi-process share, must give the fp32 value of the same inputs."""
    from e2_adapter import losses
    torch.manual_seed(0)
    img, txt = (torch.randn(6, 16).to(dtype) for _ in range(2))
    region, values = torch.randn(6, 16).to(dtype), torch.randn(3, 16).to(dtype)
    ids, scale, bias, rows = torch.tensor([0, 1, 2, 0, 0, 1]), torch.tensor(math.log(100.0)), torch.tensor(-2.0), slice(2, 5)
    calls = {
        "clip": lambda: losses.clip_loss(img, txt, scale),
        "sigmoid": lambda: losses.sigmoid_loss(img, txt, scale, bias),
        "region": lambda: losses.region_loss(region, ids, values, scale),
        "sigmoid region": lambda: losses.sigmoid_region_loss(region, ids, values, scale, bias),
        "clip share": lambda: losses.clip_loss_share(img, txt, rows, scale),
        "region share": lambda: losses.region_loss_share(region, ids, values, rows, scale),
        "e2": lambda: losses.e2_loss(img, txt, {"brand": region}, {"brand": ids}, {"brand": values}, scale)["loss"],
    }
    for name, call in calls.items():
        fp32 = call()
        with torch.autocast("cpu", dtype=dtype):
            mixed = call()
        assert mixed.dtype == torch.float32, name
        assert torch.allclose(mixed, fp32, rtol=1e-6, atol=1e-6), (name, mixed.item(), fp32.item())
