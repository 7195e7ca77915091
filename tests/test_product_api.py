"""Using a trained model: save_pretrained / from_pretrained / load_encoder, classify, tag, index and
search, ONNX export. Tiny random models, generated data."""
import argparse
import copy
import json

import pytest
import torch

import e2_adapter
from e2_adapter.pretrained import CONFIG_FILE, WEIGHTS_FILE, PretrainedFormatError
from e2_adapter.zoo import create_clip
from helpers import FAMILIES



def _perturbed(family, wrapped=True, seed=0):
    """A tiny CLIP whose weights are not the seed's init, so a reload cannot pass by re-initialising."""
    bundle = create_clip(family, "tiny", seed=seed)
    if wrapped:
        e2_adapter.wrap(bundle.model, entities=("brand", "season"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return bundle


def _outputs(bundle, images, texts):
    backend = e2_adapter.get_backend(bundle.model)
    with torch.no_grad():
        out = [backend.encode_image(images), backend.encode_text(bundle.tokenizer(texts))]
        if e2_adapter.is_wrapped(bundle.model):
            regions = e2_adapter.encode_image_regions(bundle.model, images)
            out += [regions.regions["brand"], regions.selections.float()]
    return out


# --- 1. one saved-model format and one loader --------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_rebuilds_everything_from_the_folder(family, tmp_path, one_thread):
    bundle = _perturbed(family)
    bundle.model.eval()
    images, texts = torch.rand(2, 3, 32, 32), ["a red leather bag", "FW2017"]
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["family"] == family and config["base"]["model"] == "tiny" and config["image_size"] == 32
    assert config["adapter"]["entities"] == ["brand", "season"]
    # the adapter-only format too: loaded onto a bare copy of the same base, it computes the same regions
    bare = e2_adapter.unwrap(copy.deepcopy(bundle.model))
    e2_adapter.load_adapter(bare, tmp_path / "m" / "adapter")
    with torch.no_grad():
        assert torch.equal(e2_adapter.encode_image_regions(bare, images).regions["brand"],
                           e2_adapter.encode_image_regions(bundle.model, images).regions["brand"])

    loaded = e2_adapter.from_pretrained(tmp_path / "m")
    assert loaded.family == family and loaded.image_size == 32 and not loaded.model.training
    assert e2_adapter.is_wrapped(loaded.model)
    for a, b in zip(_outputs(bundle, images, texts), _outputs(loaded, images, texts)):
        assert torch.equal(a, b)


def test_unwrapped_model_round_trips_without_adapter(tmp_path, one_thread):
    bundle = _perturbed("open_clip", wrapped=False)
    e2_adapter.save_pretrained(bundle.model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["adapter"] is None
    loaded = e2_adapter.from_pretrained(tmp_path)
    assert not e2_adapter.is_wrapped(loaded.model)
    a, b = bundle.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_is_merged_into_the_saved_weights(tmp_path, one_thread):
    from peft import LoraConfig, get_peft_model
    bundle = _perturbed("open_clip")
    model = get_peft_model(bundle.model, LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = e2_adapter.get_backend(model).encode_image(images)
    e2_adapter.save_pretrained(model, tmp_path)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the trainer's model keeps its LoRA
    loaded = e2_adapter.from_pretrained(tmp_path)
    with torch.no_grad():
        got = e2_adapter.get_backend(loaded.model).encode_image(images)
    assert torch.allclose(expected, got, atol=1e-5)


def test_from_pretrained_errors_name_the_problem(tmp_path, one_thread):
    with pytest.raises(PretrainedFormatError, match="no e2_model.json"):
        e2_adapter.from_pretrained(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(PretrainedFormatError, match="older trainer's best"):
        e2_adapter.from_pretrained(tmp_path)
    bundle = _perturbed("open_clip", wrapped=False)
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    config["architecture"], config["base"]["model"] = {}, "small"  # weights no longer fit
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PretrainedFormatError, match="does not match the architecture"):
        e2_adapter.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedFormatError, match="no model.safetensors"):
        e2_adapter.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        e2_adapter.from_pretrained(tmp_path / "missing")


def test_save_pretrained_needs_to_know_the_base(tmp_path):
    from e2_adapter.zoo import SOURCE_ATTR
    bundle = create_clip("open_clip", "tiny", seed=0)
    object.__delattr__(bundle.model, SOURCE_ATTR)  # a model built by hand
    with pytest.raises(ValueError, match="does not know where this model came from"):
        e2_adapter.save_pretrained(bundle.model, tmp_path)


def _flags(**kw):
    base = dict(family="open_clip", model="tiny", pretrained=None, image_size=None, encoder_seed=0,
                checkpoint=None, adapter=None, factory=None)
    return argparse.Namespace(**{**base, **kw})


def test_load_encoder_reads_every_form(tmp_path, one_thread):
    bundle = _perturbed("openai")
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    # A save_pretrained folder names its own family: the (wrong) base flags are not consulted.
    loaded = e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path / "m")))
    assert loaded.family == "openai" and e2_adapter.is_wrapped(loaded.model)

    # An older best/ folder (model.pt + adapter/) over the flags' base, and a .pt state dict.
    e2_adapter.save_adapter(bundle.model, tmp_path / "old" / "adapter")
    torch.save(bundle.model.state_dict(), tmp_path / "old" / "model.pt")
    old = e2_adapter.load_encoder(_flags(family="openai", checkpoint=str(tmp_path / "old")))
    images = torch.rand(2, 3, 32, 32)
    bundle.model.eval()
    for a, b in zip(_outputs(bundle, images, ["x"]), _outputs(old, images, ["x"])):
        assert torch.equal(a, b)
    plain = create_clip("hf", "tiny", seed=3).model
    torch.save(plain.state_dict(), tmp_path / "hf.pt")
    from_pt = e2_adapter.load_encoder(_flags(family="hf", pretrained=str(tmp_path / "hf.pt")))
    assert from_pt.source["pretrained"].startswith("sha256:")
    assert all(torch.equal(v, from_pt.model.state_dict()[k]) for k, v in plain.state_dict().items())

    with pytest.raises(ValueError, match="give one of --checkpoint, --adapter, --factory"):
        e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path / "m"), adapter=str(tmp_path / "old" / "adapter")))
    with pytest.raises(PretrainedFormatError, match="no e2_model.json"):
        e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path)))


def test_encoder_specs_are_parsed_the_same_everywhere(tmp_path):
    from e2_adapter.loading import parse_encoder_spec
    bundle = create_clip("open_clip", "tiny", seed=0)
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    assert parse_encoder_spec(str(tmp_path / "m"))["checkpoint"] == str(tmp_path / "m")
    assert parse_encoder_spec("pkg.mod:fn")["factory"] == "pkg.mod:fn"
    assert parse_encoder_spec("base") == {"checkpoint": None, "adapter": None, "factory": None}
    with pytest.raises(ValueError, match="not 'base'"):
        parse_encoder_spec(str(tmp_path / "nothing-here"))


def test_every_command_line_loads_a_checkpoint_through_load_encoder(tmp_path, one_thread):
    from e2_adapter.cli import build_parser
    from integrations.captioning.cli import encoder_from_spec
    from integrations.cir.cli import build_parser as cir_parser
    from integrations.cir.cli import load_encoder as cir_load
    bundle = _perturbed("open_clip")
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    expected = bundle.model.state_dict()

    def same(model):
        return all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items())

    args = build_parser().parse_args(["eval", "--data", "x.h5", "--checkpoint", str(tmp_path / "m")])
    assert same(e2_adapter.load_encoder(args).model)
    args = cir_parser().parse_args(["eval", "--data", "d", "--method", "cirevl", "--checkpoint", str(tmp_path / "m"),
                                    "--device", "cpu"])
    assert same(cir_load(args).model)
    encoder, _, _, name = encoder_from_spec({"checkpoint": str(tmp_path / "m")})
    assert same(encoder) and name == str(tmp_path / "m")


# --- models that know a small catalogue by construction ---------------------------------------------

@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    from e2_adapter.data import FashionGenH5, write_fashionsynth
    train, val = write_fashionsynth(tmp_path_factory.mktemp("synth"), products=12, val_products=12, seed=0,
                                    image_size=32, views=(1, 2))
    return FashionGenH5(val)


def _solve_into(weight: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> None:
    """Set a [out, in] projection so that ``features @ weight.T == targets`` (exact: fewer rows than columns)."""
    with torch.no_grad():
        weight.copy_(torch.linalg.lstsq(features, targets).solution.T)


def _first_views(catalogue):
    from e2_adapter.product.images import CatalogueImages
    return CatalogueImages(catalogue)


@pytest.fixture(scope="module")
def tagger(catalogue):
    """A wrapped tiny CLIP that knows the catalogue by construction (width 64 > 12 products, so each
    least-squares projection below fits exactly): its text projection maps each product's caption onto
    the global embedding of the product's first view, then its brand and season heads map each first
    view onto the (new) text embedding of the bare tag value."""
    from e2_adapter.product.classify import embed_images
    from e2_adapter.product.vocab import TAG_TEMPLATES, label_embeddings
    bundle = create_clip("open_clip", "tiny", seed=0)
    e2_adapter.wrap(bundle.model, entities=("brand", "season"))
    model = bundle.model.eval()
    image = embed_images(model, _first_views(catalogue), bundle.preprocess)
    with torch.no_grad():
        model.text_projection.copy_(torch.eye(64))  # encode_text = the pooled text features
        pooled = model.encode_text(bundle.tokenizer(catalogue.texts()))
        model.text_projection.copy_(torch.linalg.lstsq(pooled, image).solution)
    heads = e2_adapter.get_adapter(model).heads
    tags = catalogue.all_tags()
    for entity in ("brand", "season"):
        with torch.no_grad():
            heads.projs[entity].weight.copy_(torch.eye(64))  # region output = the head's normed features
            features = encode_regions_unnormalised(bundle, catalogue)[entity]
        targets = label_embeddings(model, bundle.tokenizer, tags[entity], TAG_TEMPLATES)
        _solve_into(heads.projs[entity].weight, features, targets)
    return bundle


def encode_regions_unnormalised(bundle, catalogue):
    from e2_adapter.product.images import pixel_batches
    pixels = next(pixel_batches(_first_views(catalogue), bundle.preprocess, batch_size=len(catalogue)))
    bundle.model.eval()
    return e2_adapter.encode_image_regions(bundle.model, pixels).regions


def test_tag_reads_each_entity_from_its_own_region_head(tagger, catalogue, tmp_path, one_thread):
    from e2_adapter.product import tagging_accuracy, vocabulary_from_catalogue, write_tags
    vocab = vocabulary_from_catalogue(catalogue, ("brand", "season"))
    rows = e2_adapter.tag(tagger, _first_views(catalogue), vocab, top_k=2)
    truth = catalogue.all_tags()
    assert [r["brand"][0].label for r in rows] == truth["brand"]
    assert [r["season"][0].label for r in rows] == truth["season"]
    assert all(r["brand"][0].score > 0.99 and r["brand"][0].probability > r["brand"][1].probability for r in rows)

    result = tagging_accuracy(tagger, catalogue)
    assert result["region tagging"] == {"brand": 100.0, "season": 100.0}
    assert result["global zero-shot"]["brand"] < 100.0  # the global embedding was not fitted
    assert result["chance"]["brand"] == 100.0 / len(vocab["brand"])

    ids = catalogue.product_ids()
    write_tags(rows, ids, tmp_path / "tags.csv")
    lines = (tmp_path / "tags.csv").read_text().splitlines()
    assert lines[0] == "id,brand,brand_score,season,season_score"
    assert lines[1].startswith(f"{ids[0]},{truth['brand'][0]},")
    write_tags(rows, ids, tmp_path / "tags.jsonl")
    first = json.loads((tmp_path / "tags.jsonl").read_text().splitlines()[0])
    assert first["id"] == ids[0] and [p["label"] for p in first["tags"]["season"]][0] == truth["season"][0]
    assert len(first["tags"]["season"]) == 2

    with pytest.raises(ValueError, match="no region head"):
        e2_adapter.tag(tagger, _first_views(catalogue), {"composition": ["100% silk"]})
    with pytest.raises(ValueError, match="region heads"):
        e2_adapter.tag(create_clip("open_clip", "tiny"), _first_views(catalogue), {"brand": ["x"]})


def test_classify_scores_are_cosines_of_normalised_embeddings_over_templates(catalogue, one_thread):
    import torch.nn.functional as F
    bundle = _perturbed("hf", wrapped=False)
    labels = ["Ostra", "Vetrano", "Hollis Kade"]
    templates = ["a product by {}.", "{} logo"]
    pixels = torch.rand(4, 3, 32, 32) * 5  # large pixel values: a large image norm
    rows = e2_adapter.classify(bundle, pixels, {"brand": labels}, templates={"brand": templates}, top_k=3)
    backend = e2_adapter.get_backend(bundle.model)
    with torch.no_grad():
        image = backend.encode_image(pixels)
        text = torch.stack([F.normalize(backend.encode_text(bundle.tokenizer([t.format(x) for t in templates])),
                                        dim=-1).mean(0) for x in labels])
    cos = F.cosine_similarity(image[:, None], text[None], dim=-1)
    for i, row in enumerate(rows):
        assert [p.label for p in row["brand"]] == [labels[j] for j in cos[i].argsort(descending=True)]
        assert row["brand"][0].score == pytest.approx(float(cos[i].max()), abs=1e-5)
        assert sum(p.probability for p in row["brand"]) == pytest.approx(1.0, abs=1e-5)  # top_k = all labels
    one = e2_adapter.classify(bundle, pixels, {"brand": labels}, top_k=1)
    assert all(len(r["brand"]) == 1 for r in one)
    with pytest.raises(ValueError, match="must each contain"):
        e2_adapter.classify(bundle, pixels, {"brand": labels}, templates=["no slot"])
    with pytest.raises(ValueError, match="more than once"):
        e2_adapter.classify(bundle, pixels, {"brand": ["a", "a"]})


# --- 4. index and search ------------------------------------------------------------------------------

@pytest.mark.parametrize("faiss_kind, fmt", [(None, "npy"), ("exact", "safetensors"), ("hnsw", "npy"),
                                             ("ivf", "safetensors")])
def test_index_finds_each_product_from_its_own_caption(tagger, catalogue, tmp_path, faiss_kind, fmt, one_thread):
    if faiss_kind:
        pytest.importorskip("faiss")
    index = e2_adapter.build_index(tagger, catalogue, tmp_path / "ix", faiss=faiss_kind, embeddings_format=fmt,
                                   progress=False)
    assert len(index) == len(catalogue) and (tmp_path / "ix" / f"embeddings.{fmt}").is_file()
    index = e2_adapter.CatalogueIndex.load(tmp_path / "ix")
    assert (index.faiss_index is not None) == bool(faiss_kind)
    ids, texts, tags = catalogue.product_ids(), catalogue.texts(), catalogue.all_tags()
    for p in range(len(catalogue)):
        hits = index.search_text(tagger, texts[p], k=3)
        assert hits[0].product_id == ids[p] and hits[0].score > 0.99, (p, hits)
        assert hits[0].predicted["brand"]["label"] == tags["brand"][p]  # tagged by the region heads
    hits = index.search_image(tagger, _first_views(catalogue)[4], k=1)
    assert hits[0].product_id == ids[4] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_search_filters_on_predicted_tags(tagger, catalogue, tmp_path, one_thread):
    index = e2_adapter.build_index(tagger, catalogue, tmp_path, progress=False)
    tags, ids = catalogue.all_tags(), catalogue.product_ids()
    brand = tags["brand"][0]
    others = [p for p in range(len(catalogue)) if tags["brand"][p] != brand]
    hits = index.search_text(tagger, catalogue.texts()[others[0]], k=20, filters={"brand": brand})
    assert hits and all(h.predicted["brand"]["label"] == brand for h in hits)
    assert {h.product_id for h in hits} == {ids[p] for p in range(len(catalogue)) if tags["brand"][p] == brand}
    assert index.search_text(tagger, "x", filters={"brand": "no such brand"}) == []
    with pytest.raises(ValueError, match="no such tag"):
        index.search_text(tagger, "x", filters={"colour": "red"})
    with pytest.raises(ValueError, match="search with the model that built the index"):
        index.search(torch.ones(3))
    with pytest.raises(FileNotFoundError, match="not a catalogue index"):
        e2_adapter.CatalogueIndex.load(tmp_path / "nothing")


def test_command_lines_tag_index_search_and_classify(tagger, catalogue, tmp_path, capsys, one_thread):
    from e2_adapter.cli import main
    e2_adapter.save_pretrained(tagger.model, tmp_path / "model")
    ckpt, data = str(tmp_path / "model"), str(catalogue.path)
    ids, texts, tags = catalogue.product_ids(), catalogue.texts(), catalogue.all_tags()

    main(["tag", "--checkpoint", ckpt, "--data", data, "--vocab-from", data, "--entities", "brand", "season",
          "--out", str(tmp_path / "tags.csv")])
    rows = (tmp_path / "tags.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == tags["brand"]

    main(["index", "--checkpoint", ckpt, "--data", data, "--out", str(tmp_path / "ix"), "--faiss", "exact"])
    capsys.readouterr()
    main(["search", str(tmp_path / "ix"), texts[5], "--k", "2", "--json"])  # the encoder recorded in the index
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["product_id"] == ids[5] and len(hits) == 2
    main(["search", str(tmp_path / "ix"), texts[5], "--json", "--filter", f"season={tags['season'][5]}"])
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["product_id"] == ids[5] and {h["predicted"]["season"]["label"] for h in hits} == {tags["season"][5]}
    catalogue.load_image(7).save(tmp_path / "query.png")
    main(["search", str(tmp_path / "ix"), "--image", str(tmp_path / "query.png"), "--k", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["product_id"] == ids[7]

    main(["classify", str(tmp_path / "query.png"), "--checkpoint", ckpt, "--labels", "brand=Ostra,Vetrano",
          "--labels", "season=FW2017,SS2018,FW2018", "--top-k", "2"])
    row = json.loads(capsys.readouterr().out)
    assert row["id"].endswith("query.png") and [len(row["labels"][e]) for e in ("brand", "season")] == [2, 2]
    with pytest.raises(SystemExit, match="classify needs labels"):
        main(["classify", str(tmp_path / "query.png"), "--checkpoint", ckpt])
    with pytest.raises(SystemExit, match="a text query or --image"):
        main(["search", str(tmp_path / "ix")])


# --- 5. ONNX export -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", ["open_clip"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("openai", "hf")])
def test_onnx_export_matches_pytorch_at_any_batch_size(family, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from e2_adapter.export import export_onnx
    bundle = _perturbed(family)
    export_onnx(bundle, tmp_path)  # traced at batch 2
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["image"]["outputs"] == ["image", "regions", "selections"] and meta["image"]["entities"] == ["brand", "season"]
    image_session = ort.InferenceSession(str(tmp_path / "image_encoder.onnx"))
    text_session = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"))
    model = bundle.model.eval()
    for batch in (1, 5):
        pixels = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        image, regions, selections = image_session.run(None, {"pixels": pixels.numpy()})
        with torch.no_grad():
            ref = e2_adapter.encode_image_regions(model, pixels)
        assert abs(image - ref.image.numpy()).max() <= 1e-4
        assert abs(regions[:, 0] - ref.regions["brand"].numpy()).max() <= 1e-4
        assert abs(regions[:, 1] - ref.regions["season"].numpy()).max() <= 1e-4
        assert (selections == ref.selections.numpy()).all()
        tokens = bundle.tokenizer(["FW2017", "a long navy silk coat with welt pockets", "Ostra"][:batch + 1])
        (text,) = text_session.run(None, {"tokens": tokens.numpy()})
        with torch.no_grad():
            assert abs(text - e2_adapter.get_backend(model).encode_text(tokens).numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore")
def test_export_command_writes_both_graphs_from_a_checkpoint(tmp_path, one_thread):
    pytest.importorskip("onnx")
    from e2_adapter.cli import main
    bundle = _perturbed("open_clip", wrapped=False)
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "onnx")])
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["image"]["outputs"] == ["image"] and meta["text"]["shape"] == ["batch", 32]
    assert (tmp_path / "onnx" / "image_encoder.onnx").stat().st_size > 10_000
