"""benchmarks/caption_controls.py: each condition feeds its decoder what it says, and the probe and
nearest-caption readings find a detail that is in the image embedding (a fake encoder whose image
embedding is the bag of words of its product's brand name)."""
import json
from types import SimpleNamespace

import pytest
import torch

from helpers import pixels

pytestmark = pytest.mark.usefixtures("one_thread")


class BrandEcho(torch.nn.Module):
    """A fake CLIP: text -> hashed bag of words; image -> the bag of its product's brand name."""

    def __init__(self, tokenizer, brand_by_pixels, size=1009):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.tokenizer, self.brand_by_pixels, self.size = tokenizer, brand_by_pixels, size

    def encode_text(self, tokens):
        keep = (tokens > 0) & (tokens < 49406)
        bag = torch.zeros(len(tokens), self.size).scatter_add_(1, (tokens % self.size) * keep, keep.float())
        return bag * self.scale

    def encode_image(self, images):
        brands = [self.brand_by_pixels[im.to(torch.uint8).numpy().tobytes()] for im in images]
        return self.encode_text(self.tokenizer(brands))


def decoded_conditions(controls):
    return [c for c in controls.CONDITIONS if "probe" not in c and c != "nearest caption"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, load_benchmark):
    from e2_adapter.data import write_fashionsynth
    from e2_adapter.zoo import bpe_tokenizer
    from integrations.captioning import load_corpus
    controls = load_benchmark("caption_controls")
    train_h5, val_h5 = write_fashionsynth(tmp_path_factory.mktemp("capctl"), products=30, val_products=8, seed=0,
                                          image_size=32, views=(1, 1), brands=3)
    settings = controls.Settings(**{**controls.QUICK, "max_steps": 3, "use_java": False,
                                    "decap_max_caption_tokens": 16, "decap_max_tokens": 8})
    train, val = load_corpus(train_h5, settings.style), load_corpus(val_h5, settings.style)
    brands = {pixels(im).numpy().tobytes(): f["brand"] for corpus in (train, val)
              for im, f in zip(corpus.images(), corpus.fields)}
    tokenizer = bpe_tokenizer(77)
    bundle = SimpleNamespace(model=BrandEcho(tokenizer, brands), tokenizer=tokenizer, preprocess=pixels)
    return controls, bundle, train, val, settings


def test_probe_and_nearest_caption_read_a_brand_that_is_in_the_image_embedding(setup):
    controls, bundle, train, val, settings = setup
    report = controls.control_report(bundle, train, val, settings, log=lambda _: None)
    assert list(report) == list(controls.CONDITIONS)
    assert report["linear probe"]["brand"] == 100.0
    # Only captions of the product's brand share a word with its image embedding.
    assert report["nearest caption"]["brand"] == 100.0
    assert report["nearest caption"]["BLEU@4"] > 0
    assert report["text probe"]["brand"] > 50  # chance 33: the captions state the brand
    for condition in decoded_conditions(controls):
        assert set(report[condition]) == {"BLEU@4", "CIDEr", "brand", "subcategory", "composition", "season"}


def test_decoder_inputs_remove_the_gap_and_feed_the_own_text(load_benchmark):
    controls = load_benchmark("caption_controls")
    torch.manual_seed(0)
    normalise = torch.nn.functional.normalize
    # Texts on the unit sphere of the first 6 axes; every image is its text pushed far along axis 7.
    text = normalise(torch.cat([torch.randn(25, 6), torch.zeros(25, 2)], dim=1), dim=-1)
    shift = torch.zeros(8)
    shift[6] = 3.0
    images = normalise(text + shift, dim=-1)
    train_text, val_text, train_images, val_images = text[:20], text[20:], images[:20], images[20:]
    inputs = controls.decoder_inputs(train_images, train_text, val_images, val_text)
    assert set(inputs) == set(decoded_conditions(controls))

    def own_cosine(x):
        return (normalise(x, dim=-1) * val_text).sum(-1).min().item()
    # Removing the gap brings each image next to its own text, for both decoders.
    assert own_cosine(val_images) < 0.4
    moved = inputs["capdec, gap removed"][0]
    assert own_cosine(moved) > 0.75 and torch.equal((moved @ val_text.T).argmax(1), torch.arange(5))
    torch.testing.assert_close(inputs["decap, gap removed"][0], inputs["capdec, gap removed"][0])
    assert torch.equal(inputs["capdec"][0], val_images) and torch.equal(inputs["capdec, own text"][0], val_text)
    assert [c for c, (_, project) in inputs.items() if project] == ["decap", "decap, gap removed"]
    assert torch.equal(inputs["decap, unprojected"][0], val_images)


def test_a_subset_of_conditions_and_unknown_ones(setup):
    controls, bundle, train, val, settings = setup
    report = controls.control_report(bundle, train, val, settings, conditions=("nearest caption",), log=lambda _: None)
    assert list(report) == ["nearest caption"]
    with pytest.raises(ValueError, match="unknown conditions"):
        controls.control_report(bundle, train, val, settings, conditions=("capdec on text",))


def test_aggregate_and_command_line_errors(load_benchmark, tmp_path, capsys):
    controls = load_benchmark("caption_controls")
    paths = []
    for i, brand in enumerate((20.0, 40.0)):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps({"E2": {"capdec": {"BLEU@4": 30.0, "CIDEr": 1.0, "brand": brand},
                                                "linear probe": {"brand": 60.0}}}))
    controls.main(["--aggregate", *map(str, paths)])
    out = capsys.readouterr().out
    assert "| capdec [E2] | 2 | 30.0 ± 0.0 | 1.0 ± 0.0 | 30.0 ± 14.1 |" in out
    assert "| linear probe [E2] | 2 | - | - | 60.0 ± 0.0 |" in out
    with pytest.raises(SystemExit, match="no such file"):
        controls.main(["--encoder", "A=base", "--train-h5", str(tmp_path / "nope.h5"), "--val-h5", str(paths[0])])
