"""AmazonFashion and manifest readers on tiny generated files."""

import json

import numpy as np
import pytest
from PIL import Image

from e2_adapter.data import AmazonFashion, DataFormatError, ManifestCatalogue


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), value, dtype=np.uint8)).save(path)


# -- AmazonFashion -------------------------------------------------------------------------
@pytest.fixture
def amazon(tmp_path):
    records = [{"asin": "A1", "title": "Slim jeans", "brand": "Levi's"},
               {"asin": "A2", "title": "Wool scarf", "brand": ""},
               {"asin": "A3", "title": "Sneakers", "brand": "Vans"}]
    meta = tmp_path / "meta.json"
    meta.write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "train.txt").write_text("A1\nA3\n")
    for i, r in enumerate(records):
        _image(tmp_path / "img" / f"{r['asin']}.jpg", 40 * i)
    return tmp_path


def test_amazon_json_lines_and_plain_split(amazon):
    cat = AmazonFashion(amazon / "meta.json", amazon / "img", split_file=amazon / "train.txt")
    assert len(cat) == 2 and cat.entities == ("brand",)
    assert cat.text(0) == "Levi's. Slim jeans" and cat.tags(1) == {"brand": "Vans"}
    assert cat.group(0) == "" and cat.product_id(1) == "A3" and cat.regions(0) is None
    assert cat.num_views(0) == 1 and cat.load_image(0).mode == "RGB"
    everything = AmazonFashion(amazon / "meta.json", amazon / "img")
    assert len(everything) == 3 and everything.text(1) == "Wool scarf"  # no brand: title only


def test_amazon_reference_layout_and_python_literals(tmp_path):
    # asin -> record mapping with per-product image lists, JSON split with named lists.
    (tmp_path / "meta.json").write_text(json.dumps({
        "B1": {"title": "Dress", "brand": "Acme", "images": ["B1_0.png", "B1_1.png"]},
        "B2": {"title": "Hat", "brand": "Hatco", "images": ["B2_0.png"]}}))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["B1"], "test": ["B2"]}))
    _image(tmp_path / "Fashion" / "B1" / "B1_0.png", 10)
    _image(tmp_path / "Fashion" / "B1" / "B1_1.png", 200)
    _image(tmp_path / "Fashion" / "B2_0.png", 30)  # flat folder also found
    train = AmazonFashion(tmp_path / "meta.json", tmp_path / "Fashion", tmp_path / "split.json")
    assert train.num_views(0) == 2 and np.asarray(train.load_image(0, 1)).mean() == 200
    test = AmazonFashion(tmp_path / "meta.json", tmp_path / "Fashion", tmp_path / "split.json",
                         split="test")
    assert test.text(0) == "Hatco. Hat"
    with pytest.raises(DataFormatError, match="no split 'val'.*test.*train"):
        AmazonFashion(tmp_path / "meta.json", tmp_path / "Fashion", tmp_path / "split.json",
                      split="val")
    # 2014 dumps: one Python dict literal per line.
    (tmp_path / "old.json").write_text("{'asin': 'B2', 'title': 'Hat', 'brand': 'Hatco'}\n"
                                       "{'asin': 'B9', 'title': 'Cap'}\n")
    _image(tmp_path / "flat" / "B2.png", 1)
    old = AmazonFashion(tmp_path / "old.json", tmp_path / "flat", skip_missing=True)
    assert len(old) == 1 and old.product_id(0) == "B2"


def test_amazon_errors(amazon):
    with pytest.raises(DataFormatError, match="metadata not found"):
        AmazonFashion(amazon / "missing.json", amazon / "img")
    with pytest.raises(DataFormatError, match="split file not found"):
        AmazonFashion(amazon / "meta.json", amazon / "img", split_file=amazon / "none.txt")
    with pytest.raises(DataFormatError, match="image folder not found"):
        AmazonFashion(amazon / "meta.json", amazon / "nowhere")
    (amazon / "train.txt").write_text("A1\nZZ\n")
    with pytest.raises(DataFormatError, match="1 asin.*no metadata.*ZZ"):
        AmazonFashion(amazon / "meta.json", amazon / "img", split_file=amazon / "train.txt")
    assert len(AmazonFashion(amazon / "meta.json", amazon / "img", amazon / "train.txt",
                             skip_missing=True)) == 1
    (amazon / "img" / "A2.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"no image.*: A2\. Expected <asin>\.jpg"):
        AmazonFashion(amazon / "meta.json", amazon / "img")
    (amazon / "bad.json").write_text('{"title": "no asin"}\n{"asin": "A1"}\n')
    with pytest.raises(DataFormatError, match="no 'asin'"):
        AmazonFashion(amazon / "bad.json", amazon / "img")


# -- Manifest -------------------------------------------------------------------------------
@pytest.fixture
def manifest_dir(tmp_path):
    for name, value in (("a0.png", 0), ("a1.png", 50), ("b0.png", 100)):
        _image(tmp_path / "imgs" / name, value)
    (tmp_path / "cat.csv").write_text(
        "sku,path,caption,designer,kind\n"
        "s1,imgs/a0.png,Red shirt,Acme,SHIRTS\n"
        "s1,imgs/a1.png,Red shirt,Acme,SHIRTS\n"
        f"s2,{tmp_path / 'imgs' / 'b0.png'},Blue pants,Bolt,PANTS\n")
    return tmp_path


def test_manifest_csv_groups_views_and_resolves_paths(manifest_dir):
    cat = ManifestCatalogue(manifest_dir / "cat.csv", image_column="path", text_column="caption",
                            product_column="sku", tag_columns={"brand": "designer"},
                            group_column="kind")
    assert len(cat) == 2 and cat.entities == ("brand",)
    assert cat.num_views(0) == 2 and cat.num_views(1) == 1
    assert np.asarray(cat.load_image(0, 1)).mean() == 50
    assert cat.text(1) == "Blue pants" and cat.tags(0) == {"brand": "Acme"}
    assert cat.groups() == ["SHIRTS", "PANTS"] and cat.product_ids() == ["s1", "s2"]
    # Without a product column every row is its own product.
    rows = ManifestCatalogue(manifest_dir / "cat.csv", image_column="path", text_column="caption")
    assert len(rows) == 3 and rows.entities == () and rows.group(0) == ""


def test_manifest_jsonl(manifest_dir):
    lines = [{"image": "imgs/a0.png", "text": "Red shirt", "brand": "Acme", "season": None},
             {"image": "imgs/b0.png", "text": "Blue pants", "brand": "Bolt", "season": "FW2017"}]
    path = manifest_dir / "cat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    cat = ManifestCatalogue(path, tag_columns=["brand", "season"])
    assert cat.entities == ("brand", "season")
    assert cat.tags(0) == {"brand": "Acme", "season": ""} and cat.tags(1)["season"] == "FW2017"


def test_manifest_errors(manifest_dir):
    with pytest.raises(DataFormatError, match="not found"):
        ManifestCatalogue(manifest_dir / "nope.csv")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['image', 'text'\].*"
                                              r"sku.*path.*caption"):
        ManifestCatalogue(manifest_dir / "cat.csv")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['brand'\]"):
        ManifestCatalogue(manifest_dir / "cat.csv", image_column="path", text_column="caption",
                          tag_columns=["brand"])
    (manifest_dir / "imgs" / "a1.png").unlink()
    with pytest.raises(DataFormatError, match="1 image file.*a1.png.*image_root"):
        ManifestCatalogue(manifest_dir / "cat.csv", image_column="path", text_column="caption")
    (manifest_dir / "empty.csv").write_text("image,text\n")
    with pytest.raises(DataFormatError, match="no rows"):
        ManifestCatalogue(manifest_dir / "empty.csv")
    (manifest_dir / "cat.xlsx").write_text("")
    with pytest.raises(DataFormatError, match="unknown manifest format"):
        ManifestCatalogue(manifest_dir / "cat.xlsx")
