"""Reliability and security (issue 11): every bad input is a clear error, no checkpoint runs code,
no run is lost, and a killed run resumes bit for bit. One parametrised table per area."""
import ast
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import e2_adapter
from e2_adapter import cli
from e2_adapter.files import atomic_write, atomic_write_json, atomic_write_text
from e2_adapter.data import AmazonFashion, DataFormatError, FashionGenH5, ManifestCatalogue
from e2_adapter.io import (FORWARD_FIELDS, NOT_FORWARD_FIELDS, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError,
                           BaseModelMismatchWarning, load_adapter, save_adapter)
from e2_adapter.training.checkpoint import (UnsafeCheckpointError, load_checkpoint, rng_state, set_rng_state)
from e2_adapter.training.config import TrainConfig
from e2_adapter.training.trainer import Trainer, TrainingDiverged
from e2_adapter.zoo import create_clip

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def synth(fashionsynth):
    return fashionsynth(products=64, val_products=16, seed=0, image_size=32)


@pytest.fixture(scope="module")
def synth40(fashionsynth):
    return fashionsynth(products=40, val_products=8, seed=1, image_size=32)


@pytest.fixture(scope="module")
def finished_run(synth, tmp_path_factory):
    """One short finished run (2 stage-1 + 1 stage-2 steps); tests copy it rather than train again."""
    out = tmp_path_factory.mktemp("finished") / "run"
    make_trainer(synth, out, stage2_steps=1).fit()
    return out


def copy_run(run, tmp_path):
    import shutil
    return Path(shutil.copytree(run, tmp_path / "run"))


def make_trainer(synth, out, model_seed=0, image_size=None, **overrides):
    cfg = TrainConfig(**{"batch_size": 16, "stage1_steps": 2, "stage2_steps": 2, "warmup_steps": 1,
                         "stage1_lr": 1e-3, "stage2_lr": 1e-3, **overrides})
    bundle = create_clip("open_clip", "tiny", seed=model_seed, image_size=image_size)
    return Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, FashionGenH5(synth[0]), None, cfg, out,
                   "open_clip", progress=False)


# --- 1. security ---------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_checkpoint_is_tensors_and_plain_data_and_rng_round_trips(finished_run):
    ckpt = torch.load(finished_run / "checkpoint_last.pt", weights_only=True)  # raises if anything is pickled
    assert ckpt["state"]["step"] == 3 and set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    import random
    saved = rng_state()
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(saved)
    assert torch.equal(draws[0], torch.rand(3)) and np.array_equal(draws[1], np.random.rand(3))
    assert draws[2] == [random.random() for _ in range(3)]


@pytest.mark.parametrize("where", ["top level", "inside the rng state"])
def test_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(synth, finished_run, tmp_path, where):
    marker = tmp_path / "pwned"
    out = copy_run(finished_run, tmp_path)
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    if where == "top level":
        ckpt["extra"] = Payload(marker)
    else:
        ckpt["rng"]["python"] = Payload(marker)
    torch.save(ckpt, out / "checkpoint_last.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load.*could run code"):
        make_trainer(synth, out, stage2_steps=1).fit(resume=True)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(out / "checkpoint_last.pt")
    assert not marker.exists()


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


@pytest.mark.parametrize("folder", ["e2_adapter", "integrations", "benchmarks", "examples"])
def test_every_torch_load_is_weights_only(folder):
    unsafe = [f"{p.relative_to(ROOT)}:{call.lineno}" for p in sorted((ROOT / folder).rglob("*.py"))
              for call in _torch_load_calls(p)
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert not unsafe


@pytest.mark.parametrize("product_id, image_name", [
    ("../../x", "_.._.._x"), ("a/b", "a_b"), (".hidden", "_.hidden"), ("/etc/passwd", "_etc_passwd"),
    ("12345", "12345"), ("sku-1_A.2", "sku-1_A.2"), ("..\\..\\win", "_.._.._win"),
])
def test_cir_builder_keeps_every_image_inside_its_folder(tmp_path, product_id, image_name):
    from integrations.cir.synthetic import build_synthetic_cir, safe_image_name
    assert safe_image_name(product_id) == image_name
    (tmp_path / "src").mkdir()
    rows = ["image,text,brand,subcategory,composition,id"]
    for i, (pid, colour) in enumerate([(product_id, "red"), ("other", "blue")]):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "src" / f"{i}.png")
        rows.append(f"{i}.png,A {colour} shirt. Soft,Acme,SHIRTS,100% cotton,{pid}")
    (tmp_path / "src" / "cat.csv").write_text("\n".join(rows) + "\n")
    cat = ManifestCatalogue(tmp_path / "src" / "cat.csv", product_column="id",
                            tag_columns=("brand", "subcategory", "composition"))
    out = tmp_path / "deep" / "er" / "cir"
    build_synthetic_cir(cat, out)
    written = sorted(p.name for p in (out / "images").iterdir())
    assert written == sorted([f"{image_name}.png", "other.png"])
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and "src" not in p.parts]
    assert not outside


# --- 2. the command line: one error path, every flag checked before any work ---------------------------------

def train_argv(synth, out, *extra):
    return ["train", "--family", "open_clip", "--model", "tiny", "--train", str(synth[0]), "--out", str(out),
            "--batch-size", "16", "--stage1-steps", "1", "--stage2-steps", "1", "--warmup-steps", "1", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--eval-protocol", "nope"], "unknown eval_protocol 'nope'"),
    (["--stage1-steps", "-1"], r"stage1_steps \(--stage1-steps\) must be >= 0"),
    (["--log-every", "0"], r"--log-every\) must be >= 1"),
    (["--tau-end", "0"], r"--tau-end\) must be > 0"),
    (["--tau-start", "-1"], r"--tau-start\) must be > 0"),
    (["--checkpoint-every", "-1"], r"--checkpoint-every\) must be >= 0"),
    (["--eval-every", "-5"], r"--eval-every\) must be >= 0"),
    (["--num-workers", "-1"], r"--num-workers\) must be >= 0"),
    (["--device", "quantum"], "unknown device 'quantum'"),
    (["--preset", "fancy"], "unknown preset 'fancy'"),
    (["--method", "e3"], "unknown method 'e3'"),
    (["--betas", "0.9", "1.5"], "betas"),
    (["--batch-size", "1"], "batch_size must be >= 2"),
])
def test_bad_flags_are_one_line_errors_before_any_work(synth, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli.main(train_argv(synth, out, *extra))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("e2-adapter: error: ") and "Traceback" not in err and len(err.splitlines()) <= 2
    import re
    assert re.search(message, err), err
    assert not out.exists()  # rejected before anything was written


@pytest.mark.parametrize("case, message", [
    ("missing train file", "FashionGen file not found"),
    ("out is a file", "is a file; name a folder"),
    ("grad accumulation larger than the data", "--batch-size 8 x --grad-accum 6"),
    ("run already in out", "--resume to continue it, --overwrite to replace it"),
    ("resume with nothing to resume", "nothing to resume"),
    ("missing pretrained file", "no such file"),
    ("cuda without a gpu", "no CUDA device"),
    ("out not writable", "is not writable; choose a folder"),
])
def test_user_errors_print_one_message_and_exit_2(synth, synth40, tmp_path, capsys, monkeypatch, case, message):
    out = tmp_path / "run"
    argv = train_argv(synth, out)
    if case == "missing train file":
        argv[argv.index("--train") + 1] = str(tmp_path / "nope.h5")
    elif case == "out is a file":
        out.write_text("not a folder")
    elif case == "grad accumulation larger than the data":  # 40 products: 5 batches of 8, fewer than 6
        argv = train_argv(synth40, out, "--batch-size", "8", "--grad-accum", "6")
    elif case == "run already in out":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    elif case == "resume with nothing to resume":
        argv.append("--resume")
    elif case == "missing pretrained file":
        argv += ["--pretrained", str(tmp_path / "base.pt")]
    elif case == "cuda without a gpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        argv += ["--device", "cuda"]
    elif case == "out not writable":  # root ignores chmod, so the OS's answer is simulated
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out and mode == os.W_OK
                            else real_access(path, mode))
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.splitlines()) <= 2
    assert err.startswith("e2-adapter: error: ") and message in err, err


@pytest.mark.parametrize("how", ["--debug flag", "E2_ADAPTER_DEBUG=1"])
def test_debug_shows_the_traceback(synth, tmp_path, monkeypatch, how):
    argv = train_argv(synth, tmp_path / "run", "--log-every", "0")
    if how == "--debug flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("E2_ADAPTER_DEBUG", "1")
    with pytest.raises(ValueError, match="log-every"):
        cli.main(argv)


@pytest.mark.slow  # a fresh interpreter imports torch, open_clip and transformers
def test_a_real_process_shows_no_traceback(synth, tmp_path):
    run = subprocess.run([sys.executable, "-m", "e2_adapter.cli", *train_argv(synth, tmp_path, "--tau-end", "-1")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("e2-adapter: error: tau_end (--tau-end) must be > 0")


def test_seed_seeds_a_randomly_initialised_base_model():
    args = cli.build_parser().parse_args(["train", "--model", "tiny", "--train", "x", "--out", "y"])
    def base(seed):
        args.encoder_seed = seed  # what cmd_train sets from --seed
        return cli.load_encoder(args).model.state_dict()
    a, b, c = (base(s) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- 3. nothing lost ----------------------------------------------------------------------------------------

def steps_logged(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "step" in r]


def test_overwrite_replaces_the_old_run(synth, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        make_trainer(synth, out).fit()
    make_trainer(synth, out, stage1_steps=1, stage2_steps=1, log_every=1).fit(overwrite=True)
    assert steps_logged(out) == [1, 2]  # the old run's rows are gone, not appended to


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 8}, "batch_size: checkpoint 16 vs now 8"),
    ({"method": "clip-ft-tags"}, "method: checkpoint 'e2' vs now 'clip-ft-tags'"),
    ({"stage2_lr": 1e-4}, "stage2_lr"),
    ({"image_size": 48}, "its model differs from this one"),
])
def test_resume_with_other_options_or_model_names_the_difference(synth, finished_run, tmp_path, change, message):
    out = copy_run(finished_run, tmp_path)
    saved_config = (out / "train_config.json").read_text()
    change = dict(change)
    image_size = change.pop("image_size", None)
    from e2_adapter.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=message):
        make_trainer(synth, out, stage2_steps=1, image_size=image_size, **change).fit(resume=True)
    assert (out / "train_config.json").read_text() == saved_config  # not overwritten


def test_resume_accepts_options_that_do_not_change_training(synth, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    state = make_trainer(synth, out, stage2_steps=1, log_every=3, checkpoint_every=5, num_workers=0,
                         device="cpu").fit(resume=True)
    assert state.step == 3


def test_stale_temporaries_are_removed_and_others_kept(synth, tmp_path):
    (tmp_path / "best" / "adapter").mkdir(parents=True)
    stale = [tmp_path / ".checkpoint_last.pt.x1y2.tmp", tmp_path / "best" / ".model.pt.abc.tmp",
             tmp_path / "best" / "adapter" / "tmpab12.safetensors.tmp",
             tmp_path / "best" / "adapter" / "adapter_config.json.tmp"]
    mine = tmp_path / "notes.tmp"
    for p in stale + [mine]:
        p.write_text("half written")
    make_trainer(synth, tmp_path, stage1_steps=1, stage2_steps=0).fit(overwrite=True)
    assert not any(p.exists() for p in stale) and mine.exists()
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_files_get_the_permissions_a_plain_open_gives(tmp_path, umask):
    # mkstemp's owner-only 0600 made saved models, indexes and checkpoints unreadable to a team.
    old = os.umask(umask)
    try:
        (tmp_path / "plain.json").write_text("{}")
        atomic_write_json(tmp_path / "atomic.json", {"a": 1})
        atomic_write(tmp_path / "model.bin", lambda tmp: Path(tmp).write_bytes(b"w"))
    finally:
        os.umask(old)
    mode = (tmp_path / "plain.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("atomic.json", "model.bin")] == [mode, mode]
    assert json.loads((tmp_path / "atomic.json").read_text()) == {"a": 1}


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("checkpoint_every, message", [
    (1, r"last good checkpoint is .*checkpoint_last.pt \(step 2\)"),
    (0, "no checkpoint was written yet"),
])
def test_nan_names_a_checkpoint_that_exists(synth, tmp_path, nan_loss_at, checkpoint_every, message):
    nan_loss_at(3)
    with pytest.raises(TrainingDiverged, match=message):
        make_trainer(synth, tmp_path, stage1_steps=4, checkpoint_every=checkpoint_every).fit()
    assert (tmp_path / "checkpoint_last.pt").exists() == bool(checkpoint_every)


def test_resume_does_not_repeat_logged_steps(synth, tmp_path, crash_trainer_at):
    undo = crash_trainer_at(3)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(synth, tmp_path, checkpoint_every=1, log_every=1).fit()
    undo()
    assert steps_logged(tmp_path) == [1, 2, 3]  # step 3 was logged, its checkpoint never written
    make_trainer(synth, tmp_path, checkpoint_every=1, log_every=1).fit(resume=True)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]


def test_resumed_run_counts_the_training_time_before_the_crash(synth, tmp_path, crash_trainer_at):
    undo = crash_trainer_at(3)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(synth, tmp_path, checkpoint_every=1).fit()
    undo()
    before = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["state"]["train_seconds"]
    assert before > 0
    state = make_trainer(synth, tmp_path, checkpoint_every=1).fit(resume=True)
    assert state.train_seconds > before  # the first session's steps, then the resumed ones


# --- 4. adapters -------------------------------------------------------------------------------------------

@pytest.fixture
def saved_adapter(tmp_path):
    model = e2_adapter.wrap(create_clip("open_clip", "tiny", seed=0).model, preset="faithful")
    return save_adapter(model, tmp_path / "adapter")


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _poison_weights(folder):
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / WEIGHTS_NAME))
    state["tokens"][0, 0] = float("nan")
    save_file(state, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: _edit_config(d, version=99), AdapterFileError, "version 99 is not supported"),
    (lambda d: _edit_config(d, version="abc"), AdapterFileError, "version 'abc' is not supported"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), AdapterFileError,
     r"adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), AdapterFileError, "must hold a JSON object"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:100]), AdapterFileError,
     r"cannot read adapter weights .*adapter_model.safetensors.*truncated"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b""), AdapterFileError,
     r"cannot read adapter weights .*adapter_model.safetensors"),
    (_poison_weights, AdapterFileError, r"NaN or inf values in \['tokens'\]"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, "no adapter_model.safetensors"),
])
def test_damaged_adapter_files_are_errors_naming_the_file(saved_adapter, damage, error, message):
    damage(saved_adapter)
    model = create_clip("open_clip", "tiny", seed=0).model
    with pytest.raises(error, match=message):
        load_adapter(model, saved_adapter)
    assert not e2_adapter.is_wrapped(model)


@pytest.mark.parametrize("wrapped_with", [
    {"fusion_after": (2, 5)}, {"preset": "gated"}, {"qk_rank": 8}, {"tokens_per_entity": 3},
])
def test_loading_into_a_wrapped_model_compares_every_forward_field(saved_adapter, wrapped_with):
    from e2_adapter.config import E2Config
    model = create_clip("open_clip", "tiny", seed=0).model
    e2_adapter.wrap(model, config=E2Config.from_preset(wrapped_with.pop("preset", "faithful"), **wrapped_with))
    # The gated preset differs in gated and drop_patches; the first differing field is named.
    with pytest.raises(AdapterMismatchError, match=next(iter(wrapped_with), "drop_patches|gated")):
        load_adapter(model, saved_adapter)


def test_every_config_field_is_classified_for_the_comparison():
    from dataclasses import fields
    from e2_adapter.config import E2Config
    assert {f.name for f in fields(E2Config)} == set(FORWARD_FIELDS) | set(NOT_FORWARD_FIELDS)


def test_base_model_identity_is_recorded_and_a_mismatch_warns(saved_adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        load_adapter(create_clip("open_clip", "tiny", seed=0).model, saved_adapter)  # the same base: silent
    with pytest.warns(BaseModelMismatchWarning, match="other base weights"):
        load_adapter(create_clip("open_clip", "tiny", seed=1).model, saved_adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        load_adapter(create_clip("open_clip", "tiny", seed=1).model, saved_adapter, check_base=False)


# --- 5. data -----------------------------------------------------------------------------------------------

def write_h5(path, brands, ids=None, encoding="latin-1"):
    """A minimal FashionGen-layout file: one row per product, every string column the brand-aware text."""
    n = len(brands)
    ids = list(range(n)) if ids is None else ids
    with h5py.File(path, "w") as f:
        f["input_image"] = np.zeros((n, 8, 8, 3), np.uint8)
        f["input_productID"] = np.array(ids).reshape(n, 1)
        f["input_brand"] = np.array([b.encode(encoding) for b in brands]).reshape(n, 1)
        for key in ("season", "subcategory", "composition", "description"):
            f[f"input_{key}"] = np.array([key.encode()] * n).reshape(n, 1)
    return path


@pytest.mark.parametrize("written, read_as, outcome", [
    ("utf-8", "latin-1", "warns"),           # UTF-8 file read as FashionGen's latin-1: mojibake
    ("utf-8", "utf-8", "Café"),
    ("latin-1", "latin-1", "Café"),
    ("latin-1", "utf-8", "error"),           # latin-1 bytes are not UTF-8
    ("utf-8", "klingon", "unknown encoding"),
])
def test_h5_encoding(tmp_path, written, read_as, outcome):
    path = write_h5(tmp_path / "f.h5", ["Café", "Zoë"], encoding=written)
    if outcome == "error":
        with pytest.raises(DataFormatError, match="not valid utf-8 text.*--encoding latin-1"):
            FashionGenH5(path, encoding=read_as)
    elif outcome == "unknown encoding":
        with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
            FashionGenH5(path, encoding=read_as)
    elif outcome == "warns":
        with pytest.warns(UnicodeWarning, match="double-encoded.*CafÃ©.*--encoding utf-8"):
            FashionGenH5(path, encoding=read_as)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnicodeWarning)
            assert FashionGenH5(path, encoding=read_as).tags(0)["brand"] == outcome


@pytest.mark.parametrize("ids, outcome", [
    ([b"abc", b"def"], "error"), ([b"17", b"18"], ["17", "18"]), ([5, 9], ["5", "9"]),
])
def test_h5_product_ids(tmp_path, ids, outcome):
    path = write_h5(tmp_path / "f.h5", ["A", "B"], ids=ids)
    if outcome == "error":
        with pytest.raises(DataFormatError, match="integer product ids, found 'abc'"):
            FashionGenH5(path)
    else:
        assert FashionGenH5(path).product_ids() == outcome


@pytest.fixture
def manifest(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "cat.csv").write_text("image,text,brand\n" + "".join(f"{i}.png,shirt {i},Acme\n" for i in range(3)))
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "1.png").write_bytes(b""), r"1.png \(empty \(0 bytes\)\)"),
    (lambda d: (d / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), r"1.png \(not a readable image"),
    (lambda d: (d / "1.png").write_bytes((d / "1.png").read_bytes()[:60]), r"1.png \(not a readable image"),
    (lambda d: (d / "1.png").unlink(), r"1.png \(not found\)"),
])
def test_manifest_images_are_checked_up_front(manifest, damage, message):
    damage(manifest)
    with pytest.raises(DataFormatError, match=message + r".*--skip-bad-images"):
        ManifestCatalogue(manifest / "cat.csv", tag_columns=("brand",))
    with pytest.warns(UserWarning, match="skipped 1 unusable image file.*2 product"):
        cat = ManifestCatalogue(manifest / "cat.csv", tag_columns=("brand",), bad_images="skip")
    assert cat.product_ids() == ["0", "2"] and [cat.text(p) for p in range(2)] == ["shirt 0", "shirt 2"]
    assert all(cat.load_image(p).size == (8, 8) for p in range(2))


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(b""), r"A2.jpg \(empty \(0 bytes\)\)"),
    (lambda f: f.write_bytes(f.read_bytes()[:60]), r"A2.jpg \(not a readable image"),
])
def test_amazon_images_are_checked_up_front(tmp_path, damage, message):
    (tmp_path / "img").mkdir()
    records = [{"asin": f"A{i}", "title": f"scarf {i}", "brand": "Acme"} for i in range(1, 4)]
    (tmp_path / "meta.json").write_text("\n".join(json.dumps(r) for r in records))
    for i in range(1, 4):
        Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(tmp_path / "img" / f"A{i}.jpg")
    damage(tmp_path / "img" / "A2.jpg")
    with pytest.raises(DataFormatError, match=message + r".*--skip-bad-images"):
        AmazonFashion(tmp_path / "meta.json", tmp_path / "img")
    with pytest.warns(UserWarning, match="skipped 1 unusable image file.*2 product"):
        cat = AmazonFashion(tmp_path / "meta.json", tmp_path / "img", bad_images="skip")
    assert cat.product_ids() == ["A1", "A3"] and cat.text(1) == "Acme. scarf 3"
    assert cat.load_image(1).size == (8, 8)


def test_latin1_manifest_names_the_file_and_the_encoding_flag(manifest):
    (manifest / "cat.csv").write_bytes("image,text,brand\n0.png,shirt,Hermès\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"cat.csv, line 2: not valid utf-8.*--encoding latin-1"):
        ManifestCatalogue(manifest / "cat.csv", tag_columns=("brand",))
    assert ManifestCatalogue(manifest / "cat.csv", tag_columns=("brand",), encoding="latin-1").tags(0) == \
        {"brand": "Hermès"}


# --- 6. kill and resume: a SIGKILLed training process resumes to the uninterrupted run, bit for bit -----------

KILL_RECIPE = dict(stage1_steps=3, stage2_steps=3, checkpoint_every=2, log_every=1)  # checkpoints: 2, 3, 4, 6


def _train_and_die(synth, out, kill_step, during_write):
    """In a forked child: train from scratch and SIGKILL this process at ``kill_step``, right after the
    step is logged (its checkpoint unwritten) or half-way through writing its checkpoint."""
    import io
    from e2_adapter.training import checkpoint as checkpoint_module
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if during_write:
        real_save = torch.save

        def half_written(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("state", {}).get("step") == kill_step:
                buf = io.BytesIO()
                real_save(obj, buf)
                Path(f).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
                die()
            return real_save(obj, f, *args, **kwargs)
        checkpoint_module.torch.save = half_written
    else:
        real_log = Trainer.log_step

        def log_then_die(self, *args):
            real_log(self, *args)
            if self.state.step == kill_step:
                die()
        Trainer.log_step = log_then_die
    torch.set_num_threads(1)
    make_trainer(synth, out, **KILL_RECIPE).fit()
    os._exit(0)  # not reached when the kill works


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory, one_thread):  # one thread, as the killed children run
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = make_trainer(synth, out, **KILL_RECIPE)
    trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, steps_logged(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step, during_write, resumes_from", [
    (3, False, 2),   # stage 1, mid-run: the tag-embedding cache must be rebuilt identically
    (5, False, 4),   # stage 2, mid-run
    (6, True, 4),    # stage 2, half-way through writing the final checkpoint
])
def test_sigkilled_training_resumes_bit_for_bit(synth, tmp_path, uninterrupted, kill_step, during_write,
                                                 resumes_from):
    import multiprocessing
    torch.set_num_threads(1)  # the child inherits it; the reference ran with it too
    child = multiprocessing.get_context("fork").Process(target=_train_and_die,
                                                        args=(synth, tmp_path, kill_step, during_write))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["state"]["step"] == resumes_from
    assert bool(list(tmp_path.glob(".checkpoint_last.pt.*.tmp"))) == during_write
    resumed = make_trainer(synth, tmp_path, **KILL_RECIPE)
    resumed.fit(resume=True)
    reference, reference_steps = uninterrupted
    state = resumed.model.state_dict()
    assert state.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(reference[k], state[k])]
    assert not different
    assert steps_logged(tmp_path) == reference_steps == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
