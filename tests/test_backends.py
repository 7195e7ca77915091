"""What each family backend describes beyond the five tower steps: LoRA targets, the text tower's
token table, the baseline's attention maps, and the offline rebuild of a saved model."""
import numpy as np
import pytest
import torch
from torch import nn

from e2_adapter import visualize as V
from e2_adapter.backends import BACKENDS, backend_for
from e2_adapter.zoo import FAMILIES, architecture_of, build_architecture, create_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_family_choices_come_from_the_registry():
    import argparse
    from e2_adapter.loading import add_model_flags
    p = argparse.ArgumentParser()
    add_model_flags(p)
    family = next(a for a in p._actions if a.dest == "family")
    # every backend is a choice unless another family's loader builds its models (timm towers, SigLIP)
    assert tuple(family.choices) == FAMILIES == tuple(n for n, b in BACKENDS.items() if b.zoo_family in (None, n))
    assert {"open_clip", "openai", "hf"} <= set(FAMILIES)


@pytest.mark.parametrize("family", ["open_clip", "openai", "hf"])
def test_backend_describes_its_family(family):
    bundle = create_clip(family, "tiny", seed=0)
    model = bundle.model.eval()
    backend = backend_for(model)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert backend.lora_targets and set(backend.lora_targets) <= names  # peft finds every default target
    table = backend.token_embedding()
    assert isinstance(table, nn.Embedding) and table.num_embeddings == 49408
    # rebuilt offline from what the backend records, the same layers come back
    rebuilt = build_architecture(family, "tiny", bundle.image_size, architecture_of(model, family),
                                 model._e2_source["tokenizer"]).model
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps = backend.cls_attention(images)
    assert maps.shape == (2, 16) and (maps >= 0).all() and (maps.sum(-1) <= 1 + 1e-5).all()
    # the map is the image's (exact values per family: test_visualize and the hf test below)
    assert not torch.allclose(maps[0], maps[1])


def test_hf_attention_maps_are_the_last_layers_cls_row():
    model = create_clip("hf", "tiny", seed=0).model.eval()
    model.set_attn_implementation("eager")
    images = torch.rand(2, 3, 32, 32)
    heat = V.cls_attention(model, images)
    with torch.no_grad():
        attentions = model.vision_model(pixel_values=images, output_attentions=True).attentions
    expected = attentions[-1].mean(1)[:, 0, 1:].reshape(2, 4, 4).numpy()
    assert np.allclose(heat, expected, atol=1e-6)


def test_a_family_without_an_optional_capability_says_which():
    from e2_adapter.backends import VisionBackend

    class Bare(VisionBackend):  # the five steps only (abstract here: its classmethods are enough)
        family = "bare"
    for call in (lambda: Bare.build_tiny({}), lambda: Bare.load_pretrained("x", None),
                 lambda: Bare.tokenizer_from_spec({})):
        with pytest.raises(NotImplementedError, match="bare backend does not implement"):
            call()
