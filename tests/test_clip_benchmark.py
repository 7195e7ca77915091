"""A saved E2 model evaluated by LAION's clip_benchmark: the loader's contract always, and the real
package's command line when clip_benchmark is installed (no network: a local ImageFolder dataset)."""
import json

import pytest
import torch
import torch.nn.functional as F

import e2_adapter
from e2_adapter.pretrained import PretrainedFormatError
from e2_adapter.zoo import create_clip
from integrations import clip_benchmark_e2 as cb


def saved_e2(tmp_path, family="open_clip", seed=0):
    bundle = create_clip(family, "tiny", seed=seed)
    e2_adapter.wrap(bundle.model, entities=("brand", "season"))
    with torch.no_grad():  # off the init, so a loader that re-initialised would not pass
        g = torch.Generator().manual_seed(seed + 1)
        for p in e2_adapter.get_adapter(bundle.model).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    e2_adapter.save_pretrained(bundle.model.eval(), tmp_path / f"e2-{family}")
    return bundle, tmp_path / f"e2-{family}"


def pictures(n=4, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


@pytest.mark.parametrize("family", ("open_clip", "openai", "hf"))
def test_loader_returns_what_clip_benchmark_calls(family, tmp_path, one_thread):
    bundle, folder = saved_e2(tmp_path, family)
    model, transform, tokenizer = cb.load_e2("ignored-model-name", str(folder), cache_dir=None, device="cpu")
    assert not model.training and e2_adapter.is_wrapped(model.model)
    images = torch.stack([transform(p) for p in pictures()])
    assert images.shape[-1] == bundle.image_size
    tokens = tokenizer(["a red bag", "FW2017"])
    backend = e2_adapter.get_backend(bundle.model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), backend.encode_image(images))
        assert torch.equal(model.encode_text(tokens), backend.encode_text(tokens))


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs --pretrained"):
        cb.load_e2("m", "")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cb.load_e2("m", str(tmp_path / "missing"))
    with pytest.raises(PretrainedFormatError, match="not a save_pretrained folder"):
        cb.load_e2("m", str(tmp_path))
    (tmp_path / "wrapped.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cb.load_e2("m", str(tmp_path / "wrapped.pt"))


def test_default_output_is_added_only_when_missing():
    assert cb.with_default_output(["eval", "--pretrained", "a/b"])[-2:] == ["--output", cb.DEFAULT_OUTPUT]
    assert cb.with_default_output(["eval", "--output", "x.json"]) == ["eval", "--output", "x.json"]
    assert cb.with_default_output(["build", "r.json"]) == ["build", "r.json"]


# --- the real package --------------------------------------------------------------------------------

CAPTIONS = {"0.jpg": ["a red bag", "a red leather bag"], "1.jpg": ["a blue dress", "a long dress"],
            "2.jpg": ["white shoes", "a pair of sneakers"], "3.jpg": ["a striped shirt", "a shirt"]}


def flickr_folder(root):
    """clip_benchmark's flickr30k layout, read with no download: images and a Karpathy-style
    annotation file (a header line, then ``image.jpg,caption``)."""
    root.mkdir()
    for name, picture in zip(CAPTIONS, pictures(len(CAPTIONS))):
        picture.save(root / name)
    lines = ["image,caption"] + [f"{name},{c}" for name, caps in CAPTIONS.items() for c in caps]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # importing clip_benchmark (sklearn, webdataset) takes over a minute on a busy machine
@pytest.mark.parametrize("amp", (False, True), ids=("fp32", "amp"))
def test_clip_benchmark_cli_evaluates_a_saved_e2_model(amp, tmp_path, monkeypatch, one_thread):
    """Retrieval (the task the issue ran). Its zero-shot classification metric does not run under
    numpy >= 2.4 (clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array), whatever the model."""
    pytest.importorskip("clip_benchmark.cli")
    _, folder = saved_e2(tmp_path)
    flickr_folder(tmp_path / "flickr")
    out = tmp_path / "result.json"
    monkeypatch.chdir(tmp_path)
    cb.main(["eval", "--model_type", "e2", "--pretrained", str(folder), "--dataset", "flickr30k",
             "--dataset_root", str(tmp_path / "flickr"), "--recall_k", "1", "2", "--output", str(out),
             "--num_workers", "0", "--batch_size", "4", "--quiet"] + ([] if amp else ["--no_amp"]))
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_retrieval"
    metrics = result["metrics"]

    # the recalls computed here from the same saved model
    model, transform, tokenizer = cb.load_e2(None, str(folder))
    from PIL import Image
    images = torch.stack([transform(Image.open(tmp_path / "flickr" / n).convert("RGB")) for n in CAPTIONS])
    texts = [c for caps in CAPTIONS.values() for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(CAPTIONS.values()) for _ in caps])
    with torch.no_grad(), torch.autocast("cpu", enabled=amp):
        image = F.normalize(model.encode_image(images), dim=-1).float()
        text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).float()
    scores = text @ image.T  # [texts, images]
    for k in (1, 2):
        image_recall = (scores.topk(k, dim=1).indices == owner[:, None]).any(1).float().mean().item()
        text_hits = owner[scores.T.topk(k, dim=1).indices] == torch.arange(len(CAPTIONS))[:, None]
        text_recall = text_hits.any(1).float().mean().item()
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)
