"""integrations/captioning/gap.py: the modality gap, measured from unpaired sets, removed from image
embeddings, stored beside a captioner by ``caption train --remove-gap`` and applied by ``generate``;
and captioning.py's ``remove_gap`` setting."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark
from e2_adapter.zoo import create_clip
from integrations.captioning import (embed_images, embed_texts, load_corpus, load_gap, modality_gap, remove_gap,
                                     save_gap)
from integrations.captioning.cli import encoder_from_spec, load_captioner, main
from integrations.captioning.gap import GAP_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from e2_adapter.data.synth import write_fashionsynth
    return write_fashionsynth(tmp_path_factory.mktemp("synth"), products=24, val_products=6, seed=0, image_size=32)


def test_gap_is_the_difference_of_the_normalised_means():
    images = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # normalised: e1, e2
    texts = torch.tensor([[0.0, 0.0, 5.0]])                     # e3
    assert torch.allclose(modality_gap(images, texts), torch.tensor([0.5, 0.5, -1.0]))


def test_removing_the_gap_moves_images_onto_the_text_cone():
    torch.manual_seed(0)
    shared = F.normalize(torch.randn(64, 16), dim=-1)
    offset = torch.zeros(16)
    offset[0] = 3.0  # every image sits far along one axis the texts never use
    images, texts = shared + offset, shared + 0.05 * torch.randn(64, 16)
    moved = remove_gap(images, modality_gap(images, texts))
    assert torch.allclose(moved.norm(dim=-1), torch.ones(64), atol=1e-6)
    before = (F.normalize(images, dim=-1) * F.normalize(texts, dim=-1)).sum(-1).mean()
    after = (moved * F.normalize(texts, dim=-1)).sum(-1).mean()
    assert before < 0.5 < 0.9 < after  # each image lands near its own caption's embedding


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="differ in width"):
        modality_gap(torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="another encoder"):
        remove_gap(torch.ones(2, 4), torch.ones(5))


def test_saved_gap_round_trips_and_a_foreign_file_is_refused(tmp_path):
    assert load_gap(tmp_path) is None
    gap = torch.tensor([0.25, -0.5, 1.0])
    save_gap(tmp_path, gap)
    assert torch.equal(load_gap(tmp_path), gap)
    from safetensors.torch import save_file
    save_file({"weights": torch.ones(2, 2)}, str(tmp_path / GAP_FILE))
    with pytest.raises(ValueError, match="not a modality gap"):
        load_gap(tmp_path)


def test_cli_stores_the_gap_and_generate_removes_it(tmp_path, synth):
    train, val = synth
    out = tmp_path / "decap"
    assert main(["train", "decap", "--train-h5", str(train), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--layers", "1", "--heads", "2", "--width", "32",
                 "--compact-vocab", "--remove-gap"]) == 0
    gap = load_gap(out)
    encoder, tokenizer, preprocess, _ = encoder_from_spec(json.loads((out / "encoder.json").read_text()))
    corpus = load_corpus(train, "full")
    expected_gap = modality_gap(embed_images(encoder, torch.stack([preprocess(im) for im in corpus.images()])),
                                embed_texts(encoder, tokenizer, corpus.captions))
    assert torch.allclose(gap, expected_gap, atol=1e-5)

    val_images = embed_images(encoder, torch.stack([preprocess(im) for im in load_corpus(val).images()]))
    decoder = load_captioner(out)
    written = []
    for flags, embeddings in (([], remove_gap(val_images, gap)), (["--keep-gap"], val_images)):
        captions = tmp_path / "captions.jsonl"
        assert main(["generate", "--decoder", str(out), "--h5", str(val), "--out", str(captions),
                     "--device", "cpu", "--batch-size", "4"] + flags) == 0
        got = [json.loads(line)["caption"] for line in captions.read_text().splitlines()]
        assert got == decoder.generate(embeddings)
        written.append(got)
    assert written[0] != written[1]  # the gap changes what this decoder writes, so the test can tell


def test_benchmark_setting_feeds_the_decoders_moved_images(synth, monkeypatch):
    bench = load_benchmark("captioning")
    fed = []
    monkeypatch.setattr(bench, "fit_capdec", lambda *a, **k: (Recorder(fed), [0.0]))
    encoders = {"A": create_clip("open_clip", "tiny", seed=0)}
    for remove in (False, True):
        settings = bench.Settings(**{**bench.QUICK, "use_java": False, "remove_gap": remove})
        bench.run_benchmark(encoders, synth[0], synth[1], captioners=("capdec",), seeds=(0,), settings=settings,
                            log=lambda _: None)
    raw, moved = fed
    clip = encoders["A"]
    train = load_corpus(synth[0], settings.style)
    gap = modality_gap(embed_images(clip.model, torch.stack([clip.preprocess(im) for im in train.images()])),
                       embed_texts(clip.model, clip.tokenizer, train.captions))
    assert torch.allclose(moved, remove_gap(raw, gap), atol=1e-6)


class Recorder:
    """A decoder that remembers what it was fed and captions nothing useful."""

    def __init__(self, fed):
        self.fed = fed

    def generate(self, embeddings, **_):
        self.fed.append(embeddings)
        return ["a caption."] * len(embeddings)
