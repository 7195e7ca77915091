"""One home for text embedding: the captioning and composed-retrieval integrations call the library's
``embed_texts`` and get the same numbers as it (and as the code each had before)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from e2_adapter import get_backend, wrap
from e2_adapter.evaluation.embed import embed_texts
from e2_adapter.zoo import create_clip
from integrations.captioning.encoders import embed_texts as captioning_embed_texts
from integrations.captioning.training import caption_embeddings
from integrations.cir.cirevl import encode_texts as cirevl_encode_texts

TEXTS = ["a red silk dress", "a navy wool coat by Acme", "a white cotton t-shirt", "a photo of $ that is red",
         "black leather boots"]


@pytest.fixture(scope="module", params=["open_clip", "openai", "hf"])
def bundle(request):
    return create_clip(request.param, "tiny", seed=0)


def test_integrations_give_the_librarys_embeddings(bundle):
    model, tok = bundle.model, bundle.tokenizer
    raw = embed_texts(model, tok, TEXTS, batch_size=2)
    unit = embed_texts(model, tok, TEXTS, batch_size=2, normalize=True)
    assert raw.dtype == torch.float32 and raw.device.type == "cpu" and raw.shape[0] == len(TEXTS)
    assert torch.equal(unit, F.normalize(raw, dim=-1))
    assert torch.equal(embed_texts(get_backend(model), tok, TEXTS, batch_size=2), raw)  # a backend works too
    assert torch.equal(cirevl_encode_texts(model, tok, TEXTS, batch_size=2), raw)
    assert torch.equal(captioning_embed_texts(model, tok, TEXTS, batch_size=2), unit)
    decoder = SimpleNamespace(config=SimpleNamespace(embed_dim=raw.shape[1], encoder=None))
    assert torch.equal(caption_embeddings(decoder, model, tok, TEXTS), embed_texts(model, tok, TEXTS, normalize=True))
    # ... and what each computed before it called the library: the backend's encode_text in float32.
    with torch.no_grad():
        before = get_backend(model.eval()).encode_text(tok(TEXTS)).float()
    assert torch.allclose(raw, before, atol=1e-6)


def test_eval_mode_for_the_call_and_flags_restored(bundle):
    model, tok = bundle.model, bundle.tokenizer
    wrapped = wrap(create_clip(bundle.family, "tiny", seed=0).model)
    wrapped.train()
    next(wrapped.children()).eval()  # a part frozen in eval while the rest trains keeps its own flag
    flags = [m.training for m in wrapped.modules()]
    out = embed_texts(wrapped, tok, TEXTS[:2])
    assert [m.training for m in wrapped.modules()] == flags
    assert torch.allclose(out, embed_texts(model, tok, TEXTS[:2]), atol=1e-6)  # E2 leaves the text tower alone


def test_empty_inputs_keep_each_callers_contract(bundle):
    assert embed_texts(bundle.model, bundle.tokenizer, []).numel() == 0
    assert cirevl_encode_texts(bundle.model, bundle.tokenizer, []).numel() == 0
    with pytest.raises(ValueError, match="no texts"):
        captioning_embed_texts(bundle.model, bundle.tokenizer, [])


def test_the_second_embed_catalogue_is_renamed():
    from integrations.cir import pic2word
    with pytest.warns(FutureWarning, match="embed_product_images"):
        assert pic2word.embed_catalogue is pic2word.embed_product_images
    import integrations.cir as cir
    with pytest.warns(FutureWarning):
        assert cir.embed_catalogue is pic2word.embed_product_images
    with pytest.raises(AttributeError):
        pic2word.no_such_name
