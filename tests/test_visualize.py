"""Selection maps, drawings, figures, CLS attention and hit rates on tiny models (32 px, patch 8: 4x4 grid)."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import e2_adapter
from e2_adapter import visualize as V

GRID = 4


@pytest.fixture(scope="module")
def pair(make_tiny):
    """(wrapped tiny open_clip, an unwrapped copy of the same weights)."""
    model = make_tiny("open_clip")
    base = copy.deepcopy(model)
    return e2_adapter.wrap(model), base


def test_maps_shapes_and_counts(pair, images):
    model, _ = pair
    config = e2_adapter.get_adapter(model).config
    num_fusions = len(e2_adapter.get_adapter(model).fusion_after)
    model.train()  # selection_maps must pick deterministically and restore the flags
    maps = V.selection_maps(model, images, batch_size=2)
    assert model.training and e2_adapter.get_adapter(model).training
    model.eval()

    assert len(maps) == len(images)
    for image_maps in maps:
        assert list(image_maps) == list(config.entities)
        for counts in image_maps.values():
            assert counts.shape == (num_fusions, GRID, GRID)
            assert (counts >= 0).all()
            assert counts.sum(axis=(1, 2)).tolist() == [config.tokens_per_entity] * num_fusions

    # the counts are exactly the selections of encode_image_regions (entity-major tokens)
    with torch.no_grad():
        sel = e2_adapter.encode_image_regions(model, images).selections
    T = config.tokens_per_entity
    for b in range(len(images)):
        for i, entity in enumerate(config.entities):
            for f in range(num_fusions):
                expected = np.bincount(sel[b, f, i * T:(i + 1) * T].numpy(), minlength=GRID * GRID)
                assert maps[b][entity][f].ravel().tolist() == expected.tolist()


def test_maps_from_selections_hand_case():
    # 2 entities x 2 tokens, 2 fusion blocks, 4x4 grid
    sel = torch.tensor([[[0, 0, 5, 15], [3, 12, 5, 5]]])
    maps = V.maps_from_selections(sel, ("brand", "season"), 2, GRID)
    brand, season = maps[0]["brand"], maps[0]["season"]
    assert brand[0, 0, 0] == 2 and brand[0].sum() == 2
    assert brand[1, 0, 3] == 1 and brand[1, 3, 0] == 1
    assert season[0, 1, 1] == 1 and season[0, 3, 3] == 1
    assert season[1, 1, 1] == 2 and season[1].sum() == 2
    with pytest.raises(ValueError, match="tokens"):
        V.maps_from_selections(sel, ("brand",), 2, GRID)
    with pytest.raises(ValueError, match="0..15"):
        V.maps_from_selections(sel + 16, ("brand", "season"), 2, GRID)


def test_selection_maps_needs_a_wrapped_model(images, make_tiny):
    with pytest.raises(e2_adapter.NotWrappedError):
        V.selection_maps(make_tiny("open_clip"), images)


def test_draw_sizes_and_inputs(pair, images):
    model, _ = pair
    maps = V.selection_maps(model, images[:1])[0]
    drawn = V.draw_selections(images[0], maps, GRID, legend=False)
    assert isinstance(drawn, Image.Image) and drawn.mode == "RGB" and drawn.size == (224, 224)
    drawn = V.draw_selections(images[0], maps, size=96, legend=False, fusion=1)
    assert drawn.size == (96, 96)
    with_legend = V.draw_selections(Image.new("RGB", (256, 256), (200, 200, 200)), maps, GRID)
    assert with_legend.width == 256 and with_legend.height > 256
    # an entity's colour shows on a patch it picked (inside the cell, away from the outline)
    colours = {e: (255, 0, 0) for e in maps}
    plain = V.draw_selections(Image.new("RGB", (32, 32)), maps, GRID, colours=colours, legend=False, size=64)
    counts = sum(m.sum(0) for m in maps.values())
    r, c = np.argwhere(counts > 0)[0]
    red, _, _ = plain.getpixel((int(c) * 16 + 8, int(r) * 16 + 8))
    assert red > 0
    r, c = np.argwhere(counts == 0)[0]
    assert plain.getpixel((int(c) * 16 + 8, int(r) * 16 + 8)) == (0, 0, 0)


def test_denormalize_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    t = (t - torch.tensor(V.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(V.CLIP_STD).view(3, 1, 1)
    back = np.asarray(V.denormalize(t))
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1


def test_figure_written(pair, images, tmp_path):
    model, base = pair
    path = V.save_selection_figure(model, images[:2], tmp_path / "figs" / "sel.png", baseline=base,
                                   per_fusion=True, titles=["a", "b"])
    entities = e2_adapter.get_adapter(model).config.entities
    palette = V.entity_colours(entities)
    with Image.open(path) as im:
        # 3-inch cells at 100 dpi: 2 fusion columns + the baseline's, 2 rows + the legend strip
        assert im.format == "PNG" and im.size == (900, 660)
        shown = {colour for _, colour in im.convert("RGB").getcolors(1 << 24)}
    assert all(tuple(palette[e]) in shown for e in entities)  # every entity's colour is drawn
    path = V.save_selection_figure(model, images[:1], tmp_path / "plain.png")
    with Image.open(path) as im:
        assert im.size == (300, 360)  # one column (all fusion blocks), no baseline, one row


def test_figure_outlines_the_true_boxes(pair, images, tmp_path):
    model, _ = pair
    entity = e2_adapter.get_adapter(model).config.entities[0]
    plain = np.asarray(Image.open(V.save_selection_figure(model, images[:1], tmp_path / "plain.png")).convert("RGB"))
    # a box on the left half of a 64-px frame: its outline lands on the left half of the drawn image only
    boxed = V.save_selection_figure(model, images[:1], tmp_path / "boxed.png", boxes=[{entity: (4, 4, 28, 60)}],
                                    box_frame=64)
    changed = (np.asarray(Image.open(boxed).convert("RGB")) != plain).any(axis=2)
    rows, cols = np.nonzero(changed)
    assert changed.any() and cols.max() < plain.shape[1] / 2
    with pytest.raises(ValueError, match="2 images but 1 box dicts"):
        V.save_selection_figure(model, images[:2], tmp_path / "x.png", boxes=[None])
    no_fusion = e2_adapter.wrap(e2_adapter.unwrap(copy.deepcopy(model)), fusion_after=())
    with pytest.raises(ValueError, match="no fusion blocks"):
        V.save_selection_figure(no_fusion, images[:1], tmp_path / "y.png")


def _fake_selections(monkeypatch, selections):
    """Make selection_maps see ``selections`` [B, F, S] whatever the images."""
    monkeypatch.setattr(V, "encode_image_regions",
                        lambda model, x: SimpleNamespace(selections=selections[:x.shape[0]]))


def test_hit_rate_full_box_is_one(pair, images):
    model, _ = pair
    boxes = [{e: (0, 0, 32, 32) for e in e2_adapter.get_adapter(model).config.entities}] * len(images)
    rates = V.selection_hit_rate(model, images, boxes, image_size=32)
    for entity, r in rates.items():
        assert r == {0: 1.0, 1: 1.0, "chance": 1.0}


def test_hit_rate_hand_case(pair, monkeypatch):
    model, _ = pair
    # tokens (entity-major, 2 each): brand, season, subcategory, composition; 2 images, 2 fusion blocks
    sel = torch.tensor([
        [[0, 5, 1, 1, 0, 0, 0, 0], [0, 0, 15, 14, 0, 0, 0, 0]],
        [[1, 2, 3, 3, 0, 0, 0, 0], [4, 0, 10, 11, 0, 0, 0, 0]],
    ])
    _fake_selections(monkeypatch, sel)
    boxes = [
        # brand: patch 0 only (pixels 0..8 of 32); season: bottom-right 2x2 patches 10, 11, 14, 15
        {"brand": (0, 0, 8, 8), "season": (16, 16, 32, 32), "subcategory": None},
        # brand: straddles patches 0, 1, 4, 5; season: a zero-area box is skipped
        {"brand": (4, 4, 12, 12), "season": (5, 5, 5, 9)},
    ]
    rates = V.selection_hit_rate(model, torch.zeros(2, 3, 32, 32), boxes, image_size=32)
    # brand picks: image 0 f0 {0: hit, 5: miss}, f1 {0, 0: hits}; image 1 f0 {1: hit, 2: miss}, f1 {4, 0: hits}
    assert rates["brand"][0] == pytest.approx(2 / 4)
    assert rates["brand"][1] == pytest.approx(4 / 4)
    assert rates["brand"]["chance"] == pytest.approx((1 / 16 + 4 / 16) / 2)
    # season: only image 0 counts; f0 {1, 1}: misses, f1 {15, 14}: hits
    assert rates["season"] == {0: 0.0, 1: 1.0, "chance": pytest.approx(4 / 16)}
    # no usable box at all -> NaN
    assert all(np.isnan(v) for v in rates["subcategory"].values())
    assert all(np.isnan(v) for v in rates["composition"].values())

    # boxes given in a larger frame (256 px) scale to the same patches
    big = [{e: tuple(8 * v for v in b) if b else None for e, b in d.items()} for d in boxes]
    assert V.selection_hit_rate(model, torch.zeros(2, 3, 32, 32), big, image_size=256)["brand"] == rates["brand"]
    # min_overlap: the straddling box covers a quarter of each of its 4 patches -> no hit, no chance
    strict = V.selection_hit_rate(model, torch.zeros(2, 3, 32, 32), boxes, image_size=32, min_overlap=0.5)
    assert strict["brand"][0] == pytest.approx(1 / 4)
    assert strict["brand"]["chance"] == pytest.approx((1 / 16 + 0) / 2)


def test_patch_box_overlap_rectangular_frame():
    inside = V.patch_box_overlap((0, 0, 10, 5), GRID, image_size=(40, 20))  # (width, height): cells 10 x 5
    assert inside.sum() == 1 and inside[0, 0]


@pytest.mark.parametrize("family", ["open_clip", "openai"])
def test_baseline_attention(family, images, make_tiny):
    model = make_tiny(family)
    heat = V.cls_attention(model, images)
    assert heat.shape == (len(images), GRID, GRID)
    assert (heat >= 0).all() and (heat.sum(axis=(1, 2)) <= 1 + 1e-5).all()

    # equals the last block's attention computed by hand from that block's input
    blocks = model.visual.transformer.resblocks
    seen = []
    handle = blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    x = blocks[-1].ln_1(seen[0])
    with torch.no_grad():
        weights = blocks[-1].attn(x, x, x, need_weights=True)[1]  # [B, L, L], heads averaged
    assert np.allclose(heat.reshape(len(images), -1), weights[:, 0, 1:].numpy(), atol=1e-5)

    # the hooks are gone and the model computes what it did
    attn = blocks[-1].attn
    assert not attn._forward_hooks and not attn._forward_pre_hooks
    with pytest.raises(ValueError, match="unwrapped"):
        V.cls_attention(e2_adapter.wrap(copy.deepcopy(model)), images)
