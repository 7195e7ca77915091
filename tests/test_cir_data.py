"""FashionIQ layout loader, the synthetic composed-retrieval builder, caches, and the CLI end to end."""
import json

import pytest
import torch
from PIL import Image

from integrations.cir.cirevl import CaptionStore, ImageFeatures, evaluate_cirevl
from integrations.cir.cli import main as cir_main
from integrations.cir.fashioniq import FashionIQ
from integrations.cir.rewriter import ATTRIBUTES
from integrations.cir.synthetic import build_synthetic_cir, load_edits, rewriter_for

from helpers import BagOfWords, pixels


# -- a hand-written FashionIQ folder ---------------------------------------------------------------
def write_fiq(root, triplets, galleries, images, split="val", ext=".png"):
    for sub in ("captions", "image_splits", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for category, rows in triplets.items():
        (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(rows))
    for category, names in galleries.items():
        (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(names))
    for i, name in enumerate(images):
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(root / "images" / f"{name}{ext}")
    return root


@pytest.fixture
def fiq(tmp_path):
    return write_fiq(tmp_path / "fiq",
                     {"dress": [{"candidate": "d1", "target": "d2", "captions": ["is red.", "has a logo"]}],
                      "toptee": [{"candidate": "t1", "target": "t2", "captions": ["is blue", "is longer"]},
                                 {"candidate": "t2", "target": "t1", "captions": ["is black", "is shorter"]}]},
                     {"dress": ["d1", "d2", "d3"], "toptee": ["t1", "t2"]},
                     ["d1", "d2", "d3", "t1", "t2"])


def test_fashioniq_loader(fiq):
    ds = FashionIQ(fiq)
    assert ds.categories == ("dress", "toptee")  # found on disk, FashionIQ's order
    assert ds.gallery("dress") == ["d1", "d2", "d3"]
    t = ds.triplets("dress")[0]
    assert (t.reference, t.target, t.category) == ("d1", "d2", "dress")
    assert t.modification == "is red and has a logo"
    assert len(ds.triplets()) == 3
    assert ds.load_image("d3").size == (8, 8) and ds.load_image("d3").mode == "RGB"
    assert FashionIQ(fiq, categories=["toptee"]).categories == ("toptee",)
    (fiq / "images" / "d3.png").rename(fiq / "images" / "d3.jpg")
    assert FashionIQ(fiq).image_path("d3").suffix == ".jpg"  # .png, .jpg and .jpeg are all FashionIQ


def test_fashioniq_clear_errors(fiq, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing 'captions/'"):
        FashionIQ(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="cap.shirt.val.json"):
        FashionIQ(fiq, categories=["shirt"])
    with pytest.raises(FileNotFoundError, match="no captions"):
        FashionIQ(fiq, split="train")
    with pytest.raises(ValueError, match="split must be"):
        FashionIQ(fiq, split="dev")
    ds = FashionIQ(fiq)
    with pytest.raises(FileNotFoundError, match="image 'zz' not found"):
        ds.load_image("zz")
    with pytest.raises(KeyError, match="unknown category"):
        ds.gallery("shirt")
    (fiq / "image_splits" / "split.dress.val.json").write_text(json.dumps(["d1", "d3"]))
    with pytest.raises(ValueError, match="not in split.dress.val.json"):
        FashionIQ(fiq)
    (fiq / "captions" / "cap.dress.val.json").write_text(json.dumps([{"target": "d2"}]))
    with pytest.raises(ValueError, match="candidate"):
        FashionIQ(fiq)


# -- the synthetic set ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from e2_adapter.data import write_fashionsynth
    root = tmp_path_factory.mktemp("synth")
    train, val = write_fashionsynth(root / "h5", products=40, val_products=60, seed=0, image_size=32,
                                    views=(1, 2), brands=3, subcategories=3, compositions=3, colours=3)
    summary = build_synthetic_cir(val, root / "cir", per_attribute=12, seed=0)
    return root, train, summary


def test_synthetic_triplets_differ_in_exactly_the_edited_attribute(synth):
    root, _, summary = synth
    cir = root / "cir"
    products = json.loads((cir / "products.val.json").read_text())
    assert summary["products"] == len(products) == 60
    ds = FashionIQ(cir)
    assert set(ds.categories) == set(ATTRIBUTES)
    edits = load_edits(cir)
    assert len(edits) == len(ds.triplets()) == sum(summary["triplets"].values())
    assert all(0 < n <= 12 for n in summary["triplets"].values())
    for edit in edits:
        t = ds.triplets(edit["category"])[edit["index"]]
        assert (t.reference, t.target) == (edit["reference"], edit["target"])
        ref, tgt = products[t.reference], products[t.target]
        differing = [a for a in ATTRIBUTES if ref[a] != tgt[a]]
        assert differing == [edit["attribute"]] == [t.category]
        assert (ref[edit["attribute"]], tgt[edit["attribute"]]) == (edit["from"], edit["to"])
        assert len(t.captions) == 2 and all(t.captions)
    for category in ds.categories:
        assert ds.gallery(category) == list(products)  # one gallery: every product
    assert ds.load_image(ds.triplets()[0].target).size == (32, 32)
    vocab = json.loads((cir / "vocab.json").read_text())
    assert len(vocab["brands"]) == 3 and len(vocab["colours"]) == 3


def test_oracle_rewrites_reach_the_target_caption(synth):
    """With oracle captions the rule rewriter turns a colour / brand / garment edit into the target's caption."""
    cir = synth[0] / "cir"
    captions = json.loads((cir / "reference_captions.val.json").read_text())
    rw, ds = rewriter_for(cir), FashionIQ(cir)
    for category in ("colour", "brand", "subcategory"):
        for t in ds.triplets(category):
            assert rw(captions[t.reference], t.modification).lower() == captions[t.target].lower()


def test_cirevl_ranks_targets_first_with_a_perfect_encoder(synth, tmp_path):
    from e2_adapter.zoo import bpe_tokenizer
    cir = synth[0] / "cir"
    ds = FashionIQ(cir)
    captions = json.loads((cir / "reference_captions.val.json").read_text())
    tokenizer = bpe_tokenizer(77)
    model = BagOfWords(tokenizer, {pixels(ds.load_image(n)).numpy().tobytes(): captions[n] for n in captions})
    report, composer = evaluate_cirevl(model, tokenizer, pixels, ds, captions, rewriter_for(cir),
                                       cache_dir=tmp_path / "cache")
    for category in ("colour", "brand", "subcategory"):
        assert report[category]["R@10"] == 100.0, composer.log
    assert report["average"]["queries"] == len(ds.triplets())
    assert len(list((tmp_path / "cache").glob("gallery-*.safetensors"))) == 1


def test_gallery_cache_is_reused_and_keyed_by_model(synth, tmp_path):
    from e2_adapter.zoo import create_clip
    ds = FashionIQ(synth[0] / "cir")
    names = ds.gallery("colour")
    b = create_clip("open_clip", "tiny", seed=0)
    first = ImageFeatures.for_dataset(b.model, b.preprocess, ds, cache_dir=tmp_path)
    first.precompute(names)
    calls = []
    second = ImageFeatures.for_dataset(b.model, b.preprocess, ds, cache_dir=tmp_path)
    second._encode = lambda todo: calls.append(todo) or []
    second.precompute(names)
    assert calls == [] and torch.equal(second(names), first(names))
    other = create_clip("open_clip", "tiny", seed=1)
    third = ImageFeatures.for_dataset(other.model, other.preprocess, ds, cache_dir=tmp_path)
    third.precompute(names)
    assert len(list(tmp_path.glob("gallery-*.safetensors"))) == 2
    assert not torch.equal(third(names), first(names))


def test_caption_store_uses_captioner_once_and_caches(fiq, tmp_path):
    ds = FashionIQ(fiq)
    seen = []

    def captioner(images):
        seen.extend(images)
        return [f"a black dress number {len(seen)}" for _ in images]
    store = CaptionStore(captioner=captioner, path=tmp_path / "captions.json")
    assert store(["d1", "d2", "d1"], ds.load_image)[0] == store(["d1"], ds.load_image)[0]
    assert len(seen) == 2
    assert json.loads((tmp_path / "captions.json").read_text()).keys() == {"d1", "d2"}
    assert CaptionStore(path=tmp_path / "captions.json")(["d2"], ds.load_image) == [store.captions["d2"]]
    with pytest.raises(KeyError, match="no caption"):
        CaptionStore({"d1": "x"})(["d2"], ds.load_image)


def test_cli_build_train_eval(synth, tmp_path):
    root, train_h5, _ = synth
    out = tmp_path / "cir"
    summary = cir_main(["build", "--catalogue", str(root / "h5" / "fashionsynth_validation.h5"), "--out", str(out),
                        "--per-attribute", "5", "--attributes", "colour,brand"])
    assert summary["triplets"] == {"colour": 5, "brand": 5}
    model = ["--family", "openai", "--model", "tiny", "--image-size", "32"]
    cir_main(["train", "--data", str(train_h5), "--out", str(tmp_path / "phi"), "--steps", "3",
              "--batch-size", "16", "--hidden-dim", "64", *model])
    assert (tmp_path / "phi" / "mapper.safetensors").is_file()
    for method, extra in (("cirevl", ["--descriptions", str(tmp_path / "desc.json")]),
                          ("pic2word", ["--mapper", str(tmp_path / "phi")])):
        result = cir_main(["eval", "--data", str(out), "--method", method, "--json", str(tmp_path / f"{method}.json"),
                           "--cache", str(tmp_path / "cache"), *extra, *model])
        assert set(result["results"]) == {"colour", "brand", "average"}
        assert json.loads((tmp_path / f"{method}.json").read_text())["results"]["average"]["queries"] == 10
    assert len(json.loads((tmp_path / "desc.json").read_text())) == 10
    with pytest.raises(SystemExit, match="--mapper"):
        cir_main(["eval", "--data", str(out), "--method", "pic2word", *model])


@pytest.mark.parametrize("family", ["open_clip", "openai", "hf"])
def test_both_methods_run_for_every_family(synth, family):
    from e2_adapter.zoo import create_clip
    from integrations.cir.pic2word import MapperConfig, PseudoWordMapper, evaluate_pic2word
    from integrations.cir.text_injection import token_width
    ds = FashionIQ(synth[0] / "cir", categories=["colour"])
    b = create_clip(family, "tiny", seed=0)
    captions = json.loads((synth[0] / "cir" / "reference_captions.val.json").read_text())
    report, _ = evaluate_cirevl(b.model, b.tokenizer, b.preprocess, ds, captions)
    assert set(report) == {"colour", "average"} and 0 <= report["colour"]["R@10"] <= 100
    mapper = PseudoWordMapper(MapperConfig(64, token_width(b.model), hidden_dim=32))
    report = evaluate_pic2word(b.model, b.tokenizer, b.preprocess, ds, mapper)
    assert 0 <= report["colour"]["R@10"] <= report["colour"]["R@50"] <= 100
    assert report["colour"]["queries"] == len(ds.triplets("colour"))
