"""benchmarks/wise_ft.py: the sweep mixes from the fine-tuned weights at every alpha, alpha 0 of a plain
fine-tune is its base, and the script runs end to end on a generated world."""
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_sweep_starts_each_alpha_from_the_fine_tuned_weights(load_benchmark):
    from types import SimpleNamespace

    from e2_adapter.zoo import create_clip
    wise = load_benchmark("wise_ft")
    base = create_clip("open_clip", "tiny", seed=0).model
    tuned = perturbed(create_clip("open_clip", "tiny", seed=0).model)
    key = "visual.proj"
    b, t = base.state_dict()[key].clone(), tuned.state_dict()[key].clone()
    rows = wise.sweep(SimpleNamespace(model=tuned), base.state_dict(), [0.5, 0.5, 0.0, 1.0],
                      lambda bundle: bundle.model.state_dict()[key].clone())
    assert list(rows) == ["0.5", "0"] + ["1"]  # a repeated alpha is one row
    torch.testing.assert_close(rows["0.5"], 0.5 * b + 0.5 * t)
    torch.testing.assert_close(rows["0"], b)
    assert torch.equal(rows["1"], t) and torch.equal(tuned.state_dict()[key], t)  # left fine-tuned


def test_end_to_end_alpha_zero_of_a_plain_fine_tune_measures_the_base(load_benchmark, tmp_path):
    from e2_adapter.data import write_fashionsynth
    from e2_adapter.zoo import create_clip
    from integrations.cir.synthetic import build_synthetic_cir
    wise = load_benchmark("wise_ft")
    bundle = create_clip("open_clip", "tiny", seed=0)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    train, val = write_fashionsynth(tmp_path / "w", products=40, val_products=30, seed=0, image_size=size,
                                    views=(1, 1), brands=3)
    build_synthetic_cir(val, tmp_path / "cir", per_attribute=6, seed=0)
    torch.save(bundle.model.state_dict(), tmp_path / "base.pt")
    torch.save(perturbed(bundle.model).state_dict(), tmp_path / "tuned.pt")
    common = ["--family", "open_clip", "--model", "tiny", "--base", str(tmp_path / "base.pt"),
              "--train-h5", str(train), "--val-h5", str(val), "--cir", str(tmp_path / "cir")]
    out = wise.main(common + ["--encoder", f"FT={tmp_path / 'tuned.pt'}", "--encoder", f"base={tmp_path / 'base.pt'}",
                              "--alphas", "0", "1", "--json", str(tmp_path / "r.json")])
    assert out["FT"]["0"] == out["base"]["0"] == out["base"]["1"]
    assert out["FT"]["1"] != out["FT"]["0"] and set(out["FT"]["1"]) == set(wise.COLUMNS)
    assert json.loads((tmp_path / "r.json").read_text()) == out
    with pytest.raises(SystemExit, match="no such file"):
        wise.main(common[:4] + ["--base", str(tmp_path / "nope.pt")] + common[6:] + ["--encoder", "x=base"])
