"""Shared captioning pieces (corpus, tokenizers, encoder resolution, decoding) and the CLI end to end."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import load_benchmark
from e2_adapter.zoo import create_clip
from integrations.captioning import (STYLES, ClipBPETokenizer, WordTokenizer, embed_images, embed_texts,
                                     format_caption, load_corpus, resolve_encoder, single_sentence)
from integrations.captioning.cli import main
from integrations.captioning.decoding import beam_decode, greedy_decode


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from e2_adapter.data.synth import write_fashionsynth
    return write_fashionsynth(tmp_path_factory.mktemp("synth"), products=24, val_products=6, seed=0, image_size=32)


# -- corpus -----------------------------------------------------------------------------------------
def test_corpus_full_text_style_references_and_tags(synth):
    corpus = load_corpus(synth[0])
    assert len(corpus) == 24 and len(set(corpus.product_ids)) == 24
    caption, fields = corpus.captions[0], corpus.fields[0]
    assert caption.startswith(fields["description"].rstrip(".") + ".")
    assert caption.endswith(f"Brand: {fields['brand']}. Sub-category: {fields['subcategory']}. "
                            f"Composition: {fields['composition']}. Season: {fields['season']}.")
    pid = corpus.product_ids[0]
    assert corpus.references()[pid] == [caption]
    assert corpus.tags()[pid] == {e: fields[e] for e in ("brand", "subcategory", "composition", "season")}
    assert len(corpus.images([0, 1])) == 2


def test_caption_styles_and_custom_templates(synth):
    tags_first = load_corpus(synth[0], "tags_first").captions[0]
    assert tags_first.startswith("Brand: ")
    custom = load_corpus(synth[0], "{brand} {subcategory}", max_products=3)
    assert len(custom) == 3 and "." not in custom.captions[0]
    assert load_corpus(synth[0], "name").captions[0].endswith(".")
    with pytest.raises(ValueError, match="unknown caption style"):
        load_corpus(synth[0], "poetic")
    with pytest.raises(ValueError, match="unknown field"):
        load_corpus(synth[0], "{colour}")
    assert set(STYLES) >= {"full", "tags_first", "e2", "tags", "description", "name"}


def test_format_caption_cleans_stops_and_spaces():
    fields = {"description": "Wool coat  in navy", "brand": "Ostra.", "subcategory": "COATS",
              "composition": "100% wool", "season": "FW2016"}
    assert format_caption(STYLES["full"], fields) == ("Wool coat in navy. Brand: Ostra. Sub-category: COATS. "
                                                      "Composition: 100% wool. Season: FW2016.")
    assert single_sentence(["a navy coat.", "a red shirt"]) and not single_sentence(["a coat. By Ostra."])


# -- tokenizers -------------------------------------------------------------------------------------
def test_word_tokenizer_round_trip_and_save(tmp_path):
    text = "Brand: Kessel & Rhee. Composition: 96% cotton, 4% polyurethane. T-SHIRTS"
    tok = WordTokenizer.fit([text])
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("unseen")[0] == tok.unk_id
    from integrations.captioning.tokenizers import load_tokenizer
    assert load_tokenizer(tok.save(tmp_path), tmp_path).vocab == tok.vocab


def test_clip_bpe_decoding_drops_specials_and_tidies_punctuation():
    tok = ClipBPETokenizer()
    ids = [tok.sot_id] + tok.encode("Brand: Ostra. 100% wool, T-SHIRTS (navy)") + [tok.eos_id, 0, 0]
    assert tok.decode(ids) == "brand: ostra. 100% wool, t-shirts (navy)"


# -- encoders ---------------------------------------------------------------------------------------
def test_resolve_encoder_accepts_any_clip_like_model():
    clip = create_clip("openai", "tiny", seed=0)
    assert resolve_encoder(clip.model) is clip.model
    with pytest.raises(TypeError, match="not CLIP-like"):
        resolve_encoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs base"):
        resolve_encoder(adapter_dir="somewhere")
    with pytest.raises(ValueError, match="not both"):
        resolve_encoder(clip.model, adapter_dir="somewhere", base=clip.model)
    # the openai family works unchanged: normalised float32 rows on the CPU
    e = embed_texts(clip.model, clip.tokenizer, ["a coat", "a shirt"])
    assert e.shape == (2, 64) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert embed_images(clip.model, torch.rand(2, 3, 32, 32)).shape == (2, 64)


def test_resolve_encoder_loads_an_adapter_lazily(monkeypatch):
    import e2_adapter
    base = create_clip("open_clip", "tiny", seed=0).model
    calls = []
    monkeypatch.setattr(e2_adapter, "load_adapter", lambda model, path: calls.append(path) or model, raising=False)
    assert resolve_encoder(adapter_dir="runs/e2", base=base) is base
    assert calls == ["runs/e2"]


def test_embedding_restores_training_mode():
    clip = create_clip("open_clip", "tiny", seed=0)
    clip.model.train()
    embed_texts(clip.model, clip.tokenizer, ["a coat"])
    assert clip.model.training


# -- decoding, on a scripted Markov language model ---------------------------------------------------
class MarkovLM(nn.Module):
    """Next-token log-probabilities depend only on the previous token (the prefix counts as 'start')."""

    def __init__(self, start, table, n_positions=64):
        super().__init__()
        self.start, self.table = torch.tensor(start).log(), torch.tensor(table).log()
        self.config = SimpleNamespace(n_positions=n_positions)
        self.embed = nn.Embedding.from_pretrained(torch.eye(len(start)) + 1e-3)  # one-hot: the token is readable

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, use_cache=True, past_key_values=None):
        batch, length, _ = inputs_embeds.shape
        if past_key_values is None:  # the prefix: every position predicts from "start"
            logits = self.start.expand(batch, length, -1)
        else:
            logits = self.table[inputs_embeds[:, -1].argmax(-1)][:, None]
        cache = ((torch.zeros(batch, 1),),)  # rows follow beam re-ordering
        return SimpleNamespace(logits=logits, past_key_values=cache)


# tokens: 0 = end, 1 = "A", 2 = "B", 3 = "x"
START = [0.01, 0.50, 0.40, 0.09]
TABLE = [[0.97, 0.01, 0.01, 0.01],   # after end: end
         [0.30, 0.01, 0.35, 0.34],   # after A: unsure
         [0.97, 0.01, 0.01, 0.01],   # after B: end, confidently
         [0.97, 0.01, 0.01, 0.01]]


def test_greedy_follows_the_argmax_and_stops_at_a_stop_token():
    lm = MarkovLM(START, TABLE)
    prefix = torch.zeros(2, 3, 4)
    assert greedy_decode(lm, prefix, 10, {0}) == [[1, 2, 0], [1, 2, 0]]  # A (0.5), B (0.35), end
    assert greedy_decode(lm, prefix, 2, {0}) == [[1, 2], [1, 2]]  # max_tokens caps it
    assert greedy_decode(lm, prefix, 10, {2}) == [[1, 2], [1, 2]]  # any stop id ends the caption


def test_beam_search_prefers_the_better_mean_log_probability():
    lm = MarkovLM(START, TABLE)
    prefix = torch.zeros(1, 3, 4)
    # greedy: A B end, mean log p = (log .5 + log .35 + log .97) / 3 = -0.59
    # beam:   B end,   mean log p = (log .4 + log .97) / 2 = -0.47
    assert beam_decode(lm, prefix, 10, {0}, beam_size=3) == [[2, 0]]
    assert beam_decode(lm, prefix, 10, {0}, beam_size=1) == greedy_decode(lm, prefix, 10, {0})[:1]
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        beam_decode(lm, prefix, 10, {0}, beam_size=5)
    with pytest.raises(ValueError, match="positions"):
        beam_decode(lm, prefix, 62, {0})


def test_cached_decoding_matches_full_recomputation():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=40)).eval()
    prefix = torch.randn(3, 4, 16)
    out = greedy_decode(lm, prefix, 8, stop_ids={49})
    seq = prefix
    expected = []
    with torch.no_grad():
        for _ in range(8):
            nxt = lm(inputs_embeds=seq).logits[:, -1].argmax(-1)
            expected.append(nxt)
            seq = torch.cat([seq, lm.get_input_embeddings()(nxt)[:, None]], dim=1)
    expected = torch.stack(expected, 1).tolist()
    assert out == [row[: row.index(49) + 1] if 49 in row else row for row in expected]
    assert beam_decode(lm, prefix, 8, {49}, beam_size=1) == out


# -- CLI end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("captioner, flags", [
    ("capdec", ["--lm", "tiny", "--mapping", "mlp", "--prefix-length", "2"]),
    ("decap", ["--layers", "1", "--heads", "2", "--width", "32", "--compact-vocab"]),
])
def test_cli_train_generate_eval(tmp_path, synth, captioner, flags, capsys):
    train, val = synth
    out = tmp_path / captioner
    assert main(["train", captioner, "--train-h5", str(train), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "8", "--lr", "1e-3", "--style", "tags_first", "--device", "cpu"] + flags) == 0
    assert json.loads((out / "encoder.json").read_text())["model"] == "tiny"
    captions = tmp_path / "captions.jsonl"
    assert main(["generate", "--decoder", str(out), "--h5", str(val), "--out", str(captions), "--device", "cpu",
                 "--method", "greedy", "--max-products", "4", "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["caption"], str) for r in rows)
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--captions", str(captions), "--h5", str(val), "--style", "tags_first",
                 "--out", str(metrics), "--no-java"]) == 0
    result = json.loads(metrics.read_text())
    assert result["captions"]["n"] == 4 and 0.0 <= result["captions"]["BLEU@4"] <= 1.0
    assert set(result["entities"]) >= {"brand", "subcategory", "composition", "season", "mean"}


def test_cli_captions_with_a_transformers_clip(tmp_path, synth):
    """``caption --family hf``: a transformers CLIPModel has no encode_image / encode_text, so the
    captioner reaches both towers through the family backend, in training and in generation."""
    from e2_adapter import get_backend
    clip = create_clip("hf", "tiny", seed=0)
    assert not hasattr(clip.model, "encode_image") and resolve_encoder(clip.model) is clip.model
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(get_backend(clip.model).encode_image(x), dim=-1)
    assert torch.allclose(embed_images(clip.model, x), expected, atol=1e-6)
    train, val = synth
    out = tmp_path / "decap-hf"
    assert main(["train", "decap", "--train-h5", str(train), "--out", str(out), "--max-steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--family", "hf", "--model", "tiny", "--layers", "1", "--heads", "2",
                 "--width", "32", "--compact-vocab"]) == 0
    assert json.loads((out / "encoder.json").read_text())["family"] == "hf"
    captions = tmp_path / "captions.jsonl"
    assert main(["generate", "--decoder", str(out), "--h5", str(val), "--out", str(captions), "--device", "cpu",
                 "--method", "greedy", "--max-products", "2", "--batch-size", "2"]) == 0
    assert len(captions.read_text().splitlines()) == 2


# -- a real E2 encoder ------------------------------------------------------------------------------
def test_e2_wrapped_model_and_adapter_folder_are_drop_in_encoders(tmp_path):
    import e2_adapter
    from integrations.decap import DeCap, DeCapConfig, train_decap

    e2 = create_clip("open_clip", "tiny", seed=0)
    e2_adapter.wrap(e2.model)
    e2_adapter.save_adapter(e2.model, tmp_path / "adapter")
    base = create_clip("open_clip", "tiny", seed=0).model
    from_folder = resolve_encoder(adapter_dir=str(tmp_path / "adapter"), base=base)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(embed_images(e2.model, x), embed_images(from_folder, x), atol=1e-5)
    assert torch.allclose(embed_images(e2.model, x), embed_images(e2.model, x))  # eval mode: no Gumbel noise

    captions = ["shirts by Ostra.", "coats by Vetrano.", "pants by Ivo Brant."]
    decap = DeCap.for_captions(DeCapConfig(64, n_layer=1, n_head=2, n_embd=32, max_caption_tokens=10), captions)
    losses = train_decap(decap, e2.model, e2.tokenizer, captions, max_steps=3, batch_size=3, lr=1e-3)
    assert len(losses) == 3 and len(decap.caption(from_folder, x)) == 3


# -- the benchmark script ---------------------------------------------------------------------------
def test_benchmark_runs_and_tabulates_mean_and_std(synth):
    bench = load_benchmark("captioning")
    encoders = {"A": create_clip("open_clip", "tiny", seed=0), "B": lambda: create_clip("open_clip", "tiny", seed=1)}
    settings = bench.Settings(**{**bench.QUICK, "max_steps": 2, "max_val": 3, "use_java": False,
                                 "decap_max_caption_tokens": 16, "decap_max_tokens": 8})
    settings.capdec_lm = "tiny"
    rows = bench.run_benchmark(encoders, synth[0], synth[1], seeds=(0, 1), settings=settings, log=lambda _: None)
    assert len(rows) == 2 * 2 * 2 and {r["encoder"] for r in rows} == {"A", "B"}
    for row in rows:  # pin the numbers the table aggregates
        row["captions"]["BLEU@4"] = 0.1 if row["seed"] == 0 else 0.3
        row["entities"]["brand"] = 0.5
    table = bench.markdown_table(rows)
    assert "| capdec | A | " in table and "| decap | B | " in table
    assert "20.0 ± 14.1" in table and "50.0 ± 0.0" in table  # mean ± sample std over the two seeds, x100
