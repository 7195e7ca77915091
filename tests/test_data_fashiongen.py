"""FashionGenH5 on tiny generated files: contents, pickling, and every error path."""

import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from e2_adapter.data import (DEFAULT_TEXT_TEMPLATE, DataFormatError, FashionGenH5,
                             ProductCatalogue, write_fashionsynth)


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("fg")
    return write_fashionsynth(out, products=20, val_products=6, seed=1, views=(1, 3))[0]


def _rows(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def _write(path, data):
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return path


def test_reads_products_views_texts_tags(synth_path):
    cat = FashionGenH5(synth_path)
    raw = _rows(synth_path)
    ids = raw["input_productID"][:, 0]
    assert isinstance(cat, ProductCatalogue)
    assert len(cat) == 20 == len(np.unique(ids))
    assert sum(cat.num_views(p) for p in range(len(cat))) == len(ids)
    assert cat.entities == ("brand", "season", "subcategory", "composition")

    first = 0
    for p in range(len(cat)):
        assert cat.product_id(p) == str(ids[first])
        tags = cat.tags(p)
        assert tags["brand"] == raw["input_brand"][first, 0].decode("latin-1")
        assert cat.group(p) == tags["subcategory"]
        description = raw["input_description"][first, 0].decode("latin-1")
        assert cat.text(p) == (f"{tags['composition']}. {tags['subcategory']}. {tags['brand']}. "
                               f"{tags['season']}. {description}")
        for v in range(cat.num_views(p)):
            image = cat.load_image(p, v)
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
            assert np.array_equal(np.asarray(image), raw["input_image"][first + v])
            assert set(cat.regions(p, v)) == set(cat.entities)
        first += cat.num_views(p)

    assert cat.texts() == [cat.text(p) for p in range(len(cat))]
    assert cat.groups() == [cat.group(p) for p in range(len(cat))]
    assert cat.all_tags()["season"] == [cat.tags(p)["season"] for p in range(len(cat))]
    assert cat.product_ids() == [cat.product_id(p) for p in range(len(cat))]
    with pytest.raises(IndexError):
        cat.load_image(0, cat.num_views(0))
    with pytest.raises(IndexError):
        cat.text(len(cat))


def test_entities_template_and_max_products(synth_path):
    cat = FashionGenH5(synth_path, entities=("brand",), text_template="{name} | {brand}",
                       max_products=5)
    assert len(cat) == 5 and cat.entities == ("brand",)
    assert set(cat.tags(0)) == {"brand"} and set(cat.regions(0)) == {"brand"}
    assert cat.text(0).endswith(" | " + cat.tags(0)["brand"])
    assert cat.texts()[4] == cat.text(4)
    with pytest.raises(ValueError, match="unknown field"):
        FashionGenH5(synth_path, text_template="{colour}")
    with pytest.raises(ValueError, match="entities"):
        FashionGenH5(synth_path, entities=("colour",))
    with pytest.raises(ValueError, match="max_products"):
        FashionGenH5(synth_path, max_products=0)


def test_template_does_not_double_full_stops(tmp_path, synth_path):
    data = _rows(synth_path)
    data["input_composition"] = np.array([b"100% cotton."] * len(data["index"])).reshape(-1, 1)
    cat = FashionGenH5(_write(tmp_path / "dots.h5", data))
    assert cat.text(0).startswith("100% cotton. ")
    assert cat.tags(0)["composition"] == "100% cotton."
    assert DEFAULT_TEXT_TEMPLATE.startswith("{composition}")


def test_non_contiguous_rows_group_by_product_id(tmp_path, synth_path):
    data = {k: v[:3] for k, v in _rows(synth_path).items()}
    data["input_productID"] = np.array([[7], [8], [7]])
    cat = FashionGenH5(_write(tmp_path / "mixed.h5", data))
    assert len(cat) == 2 and cat.num_views(0) == 2 and cat.num_views(1) == 1
    assert cat.product_id(0) == "7"
    assert np.array_equal(np.asarray(cat.load_image(0, 1)), data["input_image"][2])


def test_without_region_keys_regions_is_none(tmp_path, synth_path):
    data = {k: v for k, v in _rows(synth_path).items() if not k.startswith("region_")}
    assert FashionGenH5(_write(tmp_path / "real.h5", data)).regions(0, 0) is None


def test_pickles_without_the_handle(synth_path):
    cat = FashionGenH5(synth_path)
    cat.load_image(0)  # opens the handle
    assert cat._h5 is not None
    clone = pickle.loads(pickle.dumps(cat))
    assert clone._h5 is None
    assert clone.text(3) == cat.text(3)
    assert np.array_equal(np.asarray(clone.load_image(1)), np.asarray(cat.load_image(1)))


@pytest.mark.parametrize("case", ["missing_key", "empty", "float_images", "gray_images",
                                  "row_mismatch", "region_mismatch"])
def test_bad_files_raise_clear_errors(tmp_path, synth_path, case):
    data = _rows(synth_path)
    if case == "missing_key":
        del data["input_season"]
        match = r"missing key.*input_season"
    elif case == "empty":
        data = {k: v[:0] for k, v in data.items()}
        match = "empty"
    elif case == "float_images":
        data["input_image"] = data["input_image"].astype(np.float32)
        match = "uint8"
    elif case == "gray_images":
        data["input_image"] = data["input_image"][..., 0]
        match = "N x H x W x 3"
    elif case == "row_mismatch":
        data["input_brand"] = data["input_brand"][:-1]
        match = "row counts differ.*input_brand"
    else:
        data["region_brand"] = data["region_brand"][:-1]
        match = "row counts differ.*region_brand"
    path = _write(tmp_path / f"{case}.h5", data)
    with pytest.raises(DataFormatError, match=match) as err:
        FashionGenH5(path)
    assert str(path) in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataFormatError, match="not found.*e2-adapter synth"):
        FashionGenH5(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataFormatError, match="not a readable HDF5"):
        FashionGenH5(junk)
    assert issubclass(DataFormatError, ValueError)
