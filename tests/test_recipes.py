"""The benchmark recipes are data (e2_adapter/recipes/*.json, read by TrainConfig.from_file) and give
exactly the configs the Python dicts they replaced gave, so runs before and after the move compare."""
import pytest

from e2_adapter.config import DEFAULT_ENTITIES
from e2_adapter.experiments import (FINETUNE_RECIPE, VARIANTS_RECIPE, default_batch, finetune_config,
                                    finetune_variants)
from e2_adapter.training.config import TrainConfig


# --- the former definitions, frozen here as the reference (e2_adapter/experiments.py and
# benchmarks/fashionsynth.py before the recipes moved to JSON) ------------------------------------------

def former_finetune_config(method, steps, seed, batch_size):
    return TrainConfig(method=method, stage1_steps=0, stage2_steps=steps, stage2_lr=3e-4, adapter_lr=1e-3,
                       global_weight=1.0, region_weight=0.25, tau_start=4.0, tau_end=0.5,
                       batch_size=batch_size, warmup_steps=max(steps // 20, 1), eval_every=max(steps // 4, 1),
                       seed=seed, log_every=max(steps // 20, 1))


FORMER_ENTITIES = ("brand", "season", "subcategory", "composition")
FAITHFUL = {"preset": "faithful"}
FORMER_VARIANTS = {
    "clip-ft": ("clip-ft", {}),
    "e2": ("e2", FAITHFUL),
    "e2-gated": ("e2", {"preset": "gated"}),
    "e2-paper-weights": ("e2", {**FAITHFUL, "global_weight": 0.5, "region_weight": 0.5}),
    "e2-no-fusion": ("e2", {**FAITHFUL, "fusion_after": ()}),
    "e2-no-region-loss": ("e2", {**FAITHFUL, "region_weight": 0.0}),
    "e2-lean": ("e2", {"preset": "lean"}),
    "e2-region-1": ("e2", {**FAITHFUL, "region_weight": 1.0}),
    "clip-ft-tags": ("clip-ft-tags", {}),
    **{f"e2-without-{e}": ("e2", {**FAITHFUL, "entities": tuple(x for x in FORMER_ENTITIES if x != e)})
       for e in FORMER_ENTITIES},
}


def former_variant_config(variant, steps, seed, batch):
    method, overrides = FORMER_VARIANTS[variant]
    return former_finetune_config(method, steps, seed, batch).updated(**overrides)


def assert_same_config(new: TrainConfig, old: TrainConfig) -> None:
    a, b = new.to_dict(), old.to_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key] == b[key], key
    assert new == old


# --- the recipes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["e2", "clip-ft", "clip-ft-tags"])
@pytest.mark.parametrize("steps, seed, batch", [(600, 0, 64), (20, 3, 32), (1, 1, 16), (1200, 2, 128)])
def test_finetune_recipe_equals_the_former_dict(method, steps, seed, batch):
    assert_same_config(finetune_config(method, steps, seed, batch), former_finetune_config(method, steps, seed, batch))


def test_benchmark_variants_equal_the_former_dict_in_order_and_value(load_benchmark):
    bench = load_benchmark("fashionsynth")
    # the default --variants run in this order; variants added since come after
    assert list(bench.VARIANTS)[:len(FORMER_VARIANTS)] == list(FORMER_VARIANTS)
    for variant in FORMER_VARIANTS:
        overrides = dict(bench.VARIANTS[variant])
        for steps, seed, batch in [(600, 0, 64), (7, 2, 16)]:
            new = finetune_config(overrides["method"], steps, seed, batch,
                                  **{k: v for k, v in overrides.items() if k != "method"})
            assert_same_config(new, former_variant_config(variant, steps, seed, batch))
    assert bench.DEFAULT_BATCH == default_batch() == 64


def test_ablations_leave_out_one_of_the_default_entities():
    """The variants file spells the entities out; they stay the library's default tuple minus one."""
    variants = finetune_variants()
    for e in DEFAULT_ENTITIES:
        assert tuple(variants[f"e2-without-{e}"]["adapter"]["entities"]) == tuple(x for x in DEFAULT_ENTITIES if x != e)


def test_recipe_files_are_training_configs():
    # Read as a user's --config is; a variant is a config of its own over the fine-tuning recipe.
    assert TrainConfig.from_file(FINETUNE_RECIPE).stage2_lr == 3e-4
    for name, overrides in finetune_variants().items():
        cfg = TrainConfig.from_file(FINETUNE_RECIPE, **overrides)
        assert cfg.method == overrides["method"], name
    assert VARIANTS_RECIPE.parent == FINETUNE_RECIPE.parent


def test_recipes_ship_as_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from pathlib import Path
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["e2_adapter"]
    assert "recipes/*.json" in shipped  # matches both files, relative to the e2_adapter package
    assert {FINETUNE_RECIPE.parent.name, FINETUNE_RECIPE.suffix, VARIANTS_RECIPE.suffix} == {"recipes", ".json"}
