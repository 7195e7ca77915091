"""benchmarks/cir_controls.py: each controlled query measures what it says (a bag-of-words encoder
whose image embedding is its product's oracle caption, so the expected ranks are known)."""
import json
from types import SimpleNamespace

import pytest

from integrations.cir.fashioniq import FashionIQ
from integrations.cir.synthetic import build_synthetic_cir, rewriter_for

from helpers import BagOfWords, pixels


@pytest.fixture(scope="module")
def cir(tmp_path_factory):
    from e2_adapter.data import write_fashionsynth
    root = tmp_path_factory.mktemp("controls")
    _, val = write_fashionsynth(root / "h5", products=20, val_products=60, seed=0, image_size=32,
                                views=(1, 1), brands=3, subcategories=3, compositions=3, colours=3)
    build_synthetic_cir(val, root / "cir", per_attribute=12, seed=0)
    return root / "cir", val


def oracle_encoder(cir):
    from e2_adapter.zoo import bpe_tokenizer
    ds = FashionIQ(cir)
    captions = json.loads((cir / "reference_captions.val.json").read_text())
    tokenizer = bpe_tokenizer(77)
    model = BagOfWords(tokenizer, {pixels(ds.load_image(n)).numpy().tobytes(): captions[n] for n in captions})
    return ds, SimpleNamespace(model=model, tokenizer=tokenizer, preprocess=pixels)


def test_each_query_uses_exactly_the_words_it_names(cir, load_benchmark):
    controls = load_benchmark("cir_controls")
    root, _ = cir
    ds, bundle = oracle_encoder(root)
    report = controls.control_report(bundle, ds, controls.load_products(root, "val"), rewriter_for(root))
    assert "tuned text" not in report  # needs --catalogue
    # The target's own oracle caption is the target's embedding: first, and above the reference.
    for attribute in ("brand", "colour", "fabric", "subcategory"):
        assert report["target caption"][attribute] == {"R@10": 100.0, "beats reference": 100.0}
    # Without the brand words a brand edit is decided by chance (caption lengths), with them always.
    # The title names the colour (and main material), so colour edits stay decidable from it.
    assert report["title"]["brand"]["beats reference"] < 100.0
    assert report["title + fabric"]["brand"]["beats reference"] < 100.0
    assert report["title + brand"]["brand"]["beats reference"] == 100.0
    assert report["title"]["colour"]["beats reference"] == 100.0
    assert report["title + fabric"]["fabric"]["beats reference"] == 100.0
    assert report["rewritten"]["brand"]["R@10"] == 100.0  # the rule rewriter reaches the target caption


def test_catalogue_adds_the_tuned_text_queries_and_must_match_the_set(cir, load_benchmark, tmp_path):
    controls = load_benchmark("cir_controls")
    root, val_h5 = cir
    products = controls.load_products(root, "val", str(val_h5))
    row = next(iter(products.values()))
    assert row["brand"] in row["tuned text"] and row["subcategory"] in row["tuned text"]
    ds, bundle = oracle_encoder(root)
    report = controls.control_report(bundle, ds, products, rewriter_for(root))
    assert {"tuned text", "rewritten tuned"} <= set(report)
    from e2_adapter.data import write_fashionsynth
    _, other = write_fashionsynth(tmp_path, products=5, val_products=5, seed=3, image_size=32, views=(1, 1))
    with pytest.raises(SystemExit, match="lacks"):
        controls.load_products(root, "val", str(other))


def test_aggregate_prints_mean_and_std_per_query_and_encoder(load_benchmark, tmp_path, capsys):
    controls = load_benchmark("cir_controls")
    paths = []
    for i, r10 in enumerate((40.0, 60.0)):
        cell = {"R@10": r10, "beats reference": 50.0}
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps({"A": {"title": {"brand": cell, "average": cell}}}))
    controls.main(["--aggregate", *map(str, paths)])
    out = capsys.readouterr().out
    assert "| title | A | 50.0 ± 14.1 | 50.0 ± 14.1 |" in out and "| title | A | 50.0 ± 0.0 | 50.0 ± 0.0 |" in out
