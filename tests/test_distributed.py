"""Multi-process training computes the one-process loss and gradients on the same global batch.

Fast tests check the loss shares in one process; the slow one spawns 2 gloo processes on CPU and
compares the trainer's objective under DDP with one process on the concatenated batch, and a catalogue
embedded in shards across the 2 processes with one process embedding all of it.
"""

import pytest
import torch
import torch.nn.functional as F

from e2_adapter.losses import (clip_loss, clip_loss_share, deduplicate, e2_loss, e2_loss_share, region_loss,
                               region_loss_share)
from e2_adapter.training.distributed import TagTexts, plan_tag_texts

WORLD = 2
# 7 rows: the [rank::world] split gives ranks 4 and 3 rows. "gucci" and "fw" appear on both ranks,
# "prada" only on rank 1, "ss" only on rank 0: shared values must be one candidate.
BRANDS = ["gucci", "gucci", "dior", "prada", "dior", "gucci", "prada"]
SEASONS = ["fw", "fw", "ss", "fw", "ss", "fw", "fw"]
TEXTS = [f"a {c} {g} by {b}" for c, g, b in zip(["red", "blue", "black", "white", "green", "grey", "pink"],
                                                ["shirt", "coat", "dress", "bag", "skirt", "scarf", "shoe"], BRANDS)]


def partition(n, world):
    """The trainer's split, in the order the ranks' rows are gathered."""
    return [list(range(r, n, world)) for r in range(world)]


def test_shares_of_a_partition_sum_to_the_one_process_losses():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(7, 16, generator=g, requires_grad=True)
    text = torch.randn(7, 16, generator=g, requires_grad=True)
    values, ids = deduplicate(BRANDS)
    value_text = torch.randn(len(values), 16, generator=g, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    leaves = (image, text, value_text, scale)

    def grads(loss):
        got = torch.autograd.grad(loss, leaves, allow_unused=True)  # clip_loss does not read value_text
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got)]

    for whole_loss, share in ((lambda: clip_loss(image, text, scale),
                               lambda rows: clip_loss_share(image, text, rows, scale)),
                              (lambda: region_loss(image, ids, value_text, scale),
                               lambda rows: region_loss_share(image, ids, value_text, rows, scale))):
        for counts in ([7], [4, 3], [1, 1, 5]):
            whole = whole_loss()
            starts = [sum(counts[:r]) for r in range(len(counts))]
            total = sum(share(slice(s, s + n)) for s, n in zip(starts, counts))
            torch.testing.assert_close(total, whole, atol=1e-6, rtol=1e-6)
            for a, b in zip(grads(total), grads(whole)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    parts = e2_loss_share(image, text, {"brand": image}, {"brand": ids}, {"brand": value_text}, slice(0, 7), scale)
    torch.testing.assert_close(parts["loss"], e2_loss(image, text, {"brand": image}, {"brand": ids},
                                                      {"brand": value_text}, scale)["loss"])


def test_one_process_tag_plan_is_the_batch_deduplicated():
    plan = plan_tag_texts({"brand": BRANDS, "season": SEASONS})
    assert plan.values == {"brand": ["gucci", "dior", "prada"], "season": ["fw", "ss"]}
    assert plan.mine == ["gucci", "dior", "prada", "fw", "ss"] and plan.counts == [5]
    assert plan.ids["season"].tolist() == [0, 0, 1, 0, 1, 0, 0]


def test_tag_plan_assembles_round_robin_embeddings_in_value_order():
    # 5 candidates dealt to 2 ranks: rank 0 encodes candidates 0, 2, 4 and rank 1 candidates 1, 3.
    plan = TagTexts({"brand": ["a", "b", "c"], "season": ["x", "y"]}, {}, [], [3, 2])
    gathered = torch.tensor([[0.], [2.], [4.], [1.], [3.]])  # rank 0's rows, then rank 1's
    out = plan.assemble(gathered)
    assert out["brand"].flatten().tolist() == [0, 1, 2] and out["season"].flatten().tolist() == [3, 4]


# --- the 2-process exactness test ---------------------------------------------------------------------

def _straight_through_argmax(scores, tau, training):
    """Gumbel noise comes from each process's own RNG, so a 2-process run cannot draw the noise one
    process draws for the same rows; a noise-free straight-through choice keeps the selection
    gradients (soft backward) and makes the runs comparable."""
    soft = F.softmax(scores.float() / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), scores.shape[-1]).to(soft)
    return (hard - soft.detach() + soft).to(scores.dtype)


CASES = (("clip-ft", False), ("e2", False), ("e2", True))  # (method, text frozen: stage 1's tag cache)


def _objective(method):
    import e2_adapter.modules
    from e2_adapter.config import E2Config
    from e2_adapter.training.config import TrainConfig
    from e2_adapter.training.trainer import ContrastiveObjective, prepare_model
    from e2_adapter.zoo import create_clip
    e2_adapter.modules.hard_select = _straight_through_argmax
    cfg = TrainConfig(method=method, adapter=E2Config(entities=("brand", "season")), global_weight=1.0,
                      region_weight=0.5)
    bundle = create_clip("open_clip", "tiny", seed=0)
    torch.manual_seed(1)
    model = prepare_model(bundle.model, cfg, "open_clip").train()
    return ContrastiveObjective(model, cfg, bundle.tokenizer)


def _batch():
    images = torch.rand(len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, TEXTS, {"brand": BRANDS, "season": SEASONS}


def _loss_and_grads(objective, images, texts, tags, text_frozen, ddp=None):
    module = ddp or objective
    parts = module(images, texts, tags, text_frozen)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.grad is not None}
    objective.model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in parts.items()}, grads


def _embeddings(catalogue_path, distributed):
    """A wrapped tiny model's catalogue embeddings, every view (9 products: uneven shards)."""
    from e2_adapter.data import FashionGenH5
    from e2_adapter.evaluation.embed import embed_catalogue
    objective = _objective("e2")
    catalogue = FashionGenH5(catalogue_path)
    emb = embed_catalogue(objective.model, catalogue, _transform(), objective.tokenizer, views="all",
                          batch_size=4, regions=True, distributed=distributed)
    # The product API's path (the catalogue index, tagging): first views, normalised, with regions.
    from e2_adapter.product.classify import embed_images
    from e2_adapter.product.images import CatalogueImages
    first, regions = embed_images(objective.model, CatalogueImages(catalogue), _transform(), regions=True,
                                  batch_size=4, distributed=distributed)
    return {"image": emb.image, "text": emb.text, "products": emb.image_products, **emb.regions,
            "index": first, **{f"index {e}": v for e, v in regions.items()}}


def _transform():
    from e2_adapter.zoo import clip_transform
    return clip_transform(32)


def _worker(rank, port, out_dir, catalogue_path):
    import torch.distributed as dist
    from torch import nn
    from e2_adapter.training.distributed import mean_over_ranks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        images, texts, tags = _batch()
        rows = partition(len(texts), WORLD)[rank]
        results = {}
        for method, frozen in CASES:
            objective = _objective(method)
            ddp = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
            parts, grads = _loss_and_grads(objective, images[rows], [texts[i] for i in rows],
                                           {e: [v[i] for i in rows] for e, v in tags.items()}, frozen, ddp)
            results[(method, frozen)] = (mean_over_ranks(parts), grads)
        results["embeddings"] = _embeddings(catalogue_path, distributed=True)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, one_thread, free_port):
    import torch.multiprocessing as mp
    from e2_adapter.data import write_fashionsynth
    _, catalogue_path = write_fashionsynth(tmp_path / "synth", products=8, val_products=9, seed=0, image_size=32)
    mp.spawn(_worker, args=(free_port, str(tmp_path), str(catalogue_path)), nprocs=WORLD, join=True)
    one_process_embeddings = _embeddings(catalogue_path, distributed=False)
    images, texts, tags = _batch()
    order = [i for rows in partition(len(texts), WORLD) for i in rows]  # the gathered batch's row order
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for method, frozen in CASES:
            ref_parts, ref_grads = _loss_and_grads(
                _objective(method), images[order], [texts[i] for i in order],
                {e: [v[i] for i in order] for e, v in tags.items()}, frozen)
            parts, grads = results[(method, frozen)]
            assert set(parts) == set(ref_parts)
            for k in ref_parts:
                torch.testing.assert_close(parts[k], ref_parts[k], atol=1e-5, rtol=1e-5, msg=f"{method} {k}")
            assert set(grads) == set(ref_grads) and len(grads) > 10
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=f"{method} grad {name}")
        # Embedding sharded across the ranks: every rank gets the whole catalogue, in catalogue order.
        embeddings = results["embeddings"]
        assert set(embeddings) == set(one_process_embeddings)
        assert len(embeddings["products"]) > 9 and len(embeddings["text"]) == 9  # more views than products
        assert len(embeddings["index"]) == 9 and "index brand" in embeddings
        for key, ref in one_process_embeddings.items():
            torch.testing.assert_close(embeddings[key], ref, atol=1e-5, rtol=1e-5, msg=key)
