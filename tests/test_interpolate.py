"""interpolate_weights (WiSE-FT): mixes exactly the tensors the base has, in place, and refuses a base
that is not the model's."""
import copy

import pytest
import torch

import e2_adapter
from e2_adapter import interpolate_weights


@pytest.fixture
def base_and_tuned(make_tiny):
    base = make_tiny("open_clip", seed=0)
    tuned = copy.deepcopy(base)
    e2_adapter.wrap(tuned)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    return {k: v.clone() for k, v in base.state_dict().items()}, tuned


def test_alpha_mixes_the_base_tensors_and_leaves_the_adapter_alone(base_and_tuned):
    base, model = base_and_tuned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert interpolate_weights(model, base, 0.25) == len(floats)
    after = model.state_dict()
    for k in floats:
        torch.testing.assert_close(after[k], 0.75 * base[k] + 0.25 * before[k])
    adapter = [k for k in before if k not in base]
    assert adapter and all(torch.equal(after[k], before[k]) for k in adapter)
    with torch.no_grad():  # the model's parameters themselves moved, not a copy
        assert torch.equal(dict(model.named_parameters())[floats[-1]], after[floats[-1]])


def test_alpha_one_is_the_tuned_model_and_zero_the_base(base_and_tuned):
    base, model = base_and_tuned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    interpolate_weights(model, base, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    interpolate_weights(model, base, 0.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_a_base_that_is_not_the_models_is_refused(base_and_tuned):
    base, model = base_and_tuned
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_weights(model, base, 1.5)
    with pytest.raises(ValueError, match="tensors the model lacks"):
        interpolate_weights(model, {**base, "visual.extra": torch.zeros(1)}, 0.5)
    key = next(k for k, v in base.items() if v.ndim == 2)
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate_weights(model, {**base, key: torch.zeros(3, 3)}, 0.5)
