"""The trainer on a tiny FashionSynth: both methods learn, resume is exact, errors are clear."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import e2_adapter
from e2_adapter.data import FashionGenH5
from e2_adapter.training.config import TrainConfig
from e2_adapter.training.trainer import Trainer, TrainingDiverged
from e2_adapter.zoo import create_clip


@pytest.fixture(scope="module")
def synth(fashionsynth):
    return fashionsynth(products=64, val_products=24, seed=0, image_size=32)


def make_trainer(synth, out, with_val=False, **overrides):
    cfg = TrainConfig(**{"batch_size": 16, "stage1_steps": 2, "stage2_steps": 4, "warmup_steps": 1,
                         "stage1_lr": 1e-3, "stage2_lr": 1e-3, **overrides})
    bundle = create_clip("open_clip", "tiny", seed=0)
    train = FashionGenH5(synth[0])
    val = FashionGenH5(synth[1]) if with_val else None
    return Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, train, val, cfg, out, "open_clip",
                   progress=False)


def fixed_batch_loss(trainer):
    from e2_adapter.data.datasets import TrainViews, collate
    items = [TrainViews(trainer.train_data, trainer.transform)[(p, 0)] for p in range(16)]
    batch = collate(items)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.objective(batch["image"], batch["text"], batch["tags"], text_frozen=False)["loss"].item()


@pytest.mark.parametrize("method", ["e2", "clip-ft", "clip-ft-tags"])
def test_a_few_steps_reduce_the_loss(synth, tmp_path, method):
    trainer = make_trainer(synth, tmp_path, method=method, stage2_steps=8)
    before = fixed_batch_loss(trainer)
    trainer.fit()
    # 8 steps at lr 1e-3 on the 64 products lower a fixed batch's loss by 2% (clip-ft) to 12% (e2)
    assert fixed_batch_loss(trainer) < 0.99 * before
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log and "loss" in log[0] and "images_per_s" in log[0]


def test_stage1_trains_only_e2_and_stage2_everything(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, stage2_steps=0)
    text_before = trainer.model.token_embedding.weight.clone()
    tokens_before = e2_adapter.get_adapter(trainer.model).tokens.clone()
    trainer.fit()
    assert torch.equal(text_before, trainer.model.token_embedding.weight)
    assert not torch.equal(tokens_before, e2_adapter.get_adapter(trainer.model).tokens)
    assert [s.name for s in trainer.stages] == ["stage1"]
    clip_ft = make_trainer(synth, tmp_path / "ft", method="clip-ft")
    assert [s.name for s in clip_ft.stages] == ["stage2"]  # no new parameters, no stage 1


def test_kill_and_resume_equals_uninterrupted(synth, tmp_path, crash_trainer_at):
    reference = make_trainer(synth, tmp_path / "a", checkpoint_every=1)
    reference.fit()

    crashing = make_trainer(synth, tmp_path / "b", checkpoint_every=1)
    undo = crash_trainer_at(4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    undo()

    resumed = make_trainer(synth, tmp_path / "b", checkpoint_every=1)
    resumed.fit(resume=True)
    assert resumed.state.step == reference.state.step == 6
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_validation_keeps_best_and_saves_adapter(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, with_val=True, eval_every=3, eval_protocol="sample-100")
    state = trainer.fit()
    best = max(state.history, key=lambda row: row["SumR"])
    assert len(state.history) >= 2 and (state.best_step, state.best_sumr) == (best["step"], best["SumR"])
    # best/ holds the model of that validation: reloaded, it scores what the trainer recorded
    from e2_adapter.evaluation.embed import evaluate
    loaded = e2_adapter.from_pretrained(tmp_path / "best")
    again = evaluate(loaded.model, trainer.val_data, trainer.transform, trainer.tokenizer, ("sample-100",))
    assert again["sample-100"]["SumR"] == pytest.approx(state.best_sumr, abs=1e-6)
    # and best/adapter alone puts the same E2 weights on a bare copy of the base
    bare = e2_adapter.unwrap(copy.deepcopy(loaded.model))
    adapter = e2_adapter.get_adapter(e2_adapter.load_adapter(bare, tmp_path / "best" / "adapter")).state_dict()
    for k, v in e2_adapter.get_adapter(loaded.model).state_dict().items():
        assert torch.equal(adapter[k], v), k


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(synth, tmp_path, nan_loss_at):
    trainer = make_trainer(synth, tmp_path, checkpoint_every=1)
    nan_loss_at(3)
    with pytest.raises(TrainingDiverged, match="checkpoint_last.pt"):
        trainer.fit()
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 2


def test_bad_options_are_clear(synth, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="e3")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_trainer(synth, tmp_path, batch_size=1000)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        make_trainer(synth, tmp_path / "empty").fit(resume=True)


def test_lora_stage2_trains_lora_and_e2_only(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, lora_rank=2, stage1_steps=0)
    emb = trainer.model.get_base_model().token_embedding.weight.clone()
    trainer.fit()
    assert torch.equal(emb, trainer.model.get_base_model().token_embedding.weight)
    assert any("lora_" in n and p.requires_grad for n, p in trainer.model.named_parameters())


@pytest.mark.slow  # torchrun with two processes, then two CLI subprocesses
def test_cli_train_eval_and_ddp_two_processes(synth, tmp_path, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--family", "open_clip", "--model", "tiny", "--train", synth[0], "--batch-size", "16",
              "--stage1-steps", "1", "--stage2-steps", "2", "--warmup-steps", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "e2_adapter.cli", "train", *common, "--val", synth[1], "--out", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best_SumR" in run.stdout
    ev = subprocess.run([sys.executable, "-m", "e2_adapter.cli", "eval", "--family", "open_clip", "--model", "tiny",
                         "--data", synth[1], "--checkpoint", str(tmp_path / "ddp" / "best"),
                         "--protocols", "product-full", "sample-100", "--probe-train", synth[0],
                         "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, env=env, timeout=900)
    assert ev.returncode == 0, ev.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results["linear-probe"]) >= {"brand", "season"}
    # The same evaluation under torchrun: each rank embeds a shard, rank 0 reports the same numbers.
    ddp_eval = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--standalone", *ev.args[1:-1], str(tmp_path / "eval-ddp.json")],
                              capture_output=True, text=True, env=env, timeout=900)
    assert ddp_eval.returncode == 0, ddp_eval.stderr[-3000:]
    assert ddp_eval.stdout.count("| product-full") == 1  # only rank 0 prints
    sharded = json.loads((tmp_path / "eval-ddp.json").read_text())
    for protocol in ("product-full", "sample-100"):
        for metric, value in results[protocol].items():
            assert sharded[protocol][metric] == pytest.approx(value, abs=1e-3), (protocol, metric)
    assert sharded["linear-probe"] == pytest.approx(results["linear-probe"], abs=1e-3)


# -- the adapter section of the training config -------------------------------------------------------
def test_adapter_section_sets_every_adapter_field(tmp_path):
    import json
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"method": "e2", "tau_start": 2.0,
                                "adapter": {"preset": "lean", "qk_rank": 8, "token_init": "cls",
                                            "entities": ["brand"], "tokens_per_entity": 3}}))
    cfg = TrainConfig.from_file(path)
    a = cfg.adapter
    assert (a.preset, a.qk_rank, a.token_init, a.entities, a.tokens_per_entity) == ("lean", 8, "cls", ("brand",), 3)
    assert (a.gated, a.drop_patches, a.gumbel_tau) == (False, True, 2.0) and cfg.entities == ("brand",)
    # flags override the file; a new preset re-derives its layout (no contradiction with the file's)
    over = TrainConfig.from_file(path, adapter={"preset": "gated"})
    assert over.adapter.gated and not over.adapter.drop_patches and over.adapter.qk_rank == 8
    # what is saved reads back to the same config
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="contradicts preset"):
        TrainConfig.from_dict({"adapter": {"preset": "faithful", "gated": True}})
    with pytest.raises(ValueError, match="adapter section: unknown fields"):
        TrainConfig.from_dict({"adapter": {"qk_rnak": 8}})
    with pytest.raises(ValueError, match="tau_start"):
        TrainConfig.from_dict({"adapter": {"gumbel_tau": 3.0}})


def test_flat_adapter_fields_of_an_older_config_still_load(tmp_path):
    import json
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"method": "e2", "preset": "faithful", "entities": ["brand", "season"],
                                "tokens_per_entity": 1, "fusion_after": [3, 5], "batch_size": 8}))
    with pytest.warns(FutureWarning, match="'adapter' section"):
        cfg = TrainConfig.from_file(path)
    assert cfg == TrainConfig.from_dict({"method": "e2", "batch_size": 8, "adapter": {
        "preset": "faithful", "entities": ["brand", "season"], "tokens_per_entity": 1, "fusion_after": [3, 5]}})
    assert cfg.adapter.drop_patches and cfg.adapter.fusion_after == (3, 5)


def test_train_flags_are_generated_from_both_configs_with_their_help():
    from e2_adapter import cli
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train._actions}
    assert {"qk_rank", "gated", "drop_patches", "token_init", "preset", "fusion_after", "stage1_lr"} <= set(helps)
    assert "zero-initialised gate" in helps["gated"] and "query/key" in helps["qk_rank"]
    assert "gumbel_tau" not in helps and "width" not in helps  # the trainer's tau_start; read from the model
    args = parser.parse_args(["train", "--train", "t.h5", "--out", "o", "--preset", "lean", "--qk-rank", "4",
                              "--token-init", "cls", "--fusion-after", "--stage1-lr", "0.01"])
    cfg = cli.train_config_from(args)
    assert (cfg.adapter.preset, cfg.adapter.qk_rank, cfg.adapter.token_init, cfg.adapter.fusion_after) == \
        ("lean", 4, "cls", ())
    assert cfg.stage1_lr == 0.01
    args = parser.parse_args(["train", "--train", "t.h5", "--out", "o", "--preset", "faithful", "--no-drop-patches"])
    with pytest.raises(ValueError, match="contradicts preset 'faithful'"):
        cli.train_config_from(args)
