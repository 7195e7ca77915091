"""The paper-reproduction script runs unchanged on FashionSynth at tiny scale; the demo's quick mode runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2_adapter.data import write_fashionsynth

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_fashiongen_script_on_fashionsynth(tmp_path):
    train, val = write_fashionsynth(tmp_path / "data", products=40, val_products=20, seed=1, image_size=32)
    env = {**os.environ, "TRAIN": str(train), "VAL": str(val), "OUT": str(tmp_path / "runs"), "FAMILY": "open_clip",
           "MODEL": "tiny", "PRETRAINED": "none", "OMP_NUM_THREADS": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "EXTRA": "--batch-size 16 --stage1-steps 1 --stage2-steps 2 --warmup-steps 1"}
    run = subprocess.run(["bash", str(ROOT / "examples" / "reproduce_fashiongen.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for method in ("clip-ft", "e2"):
        result = json.loads((tmp_path / "runs" / method / "eval.json").read_text())
        assert {"product-full", "image-full", "sample-100", "linear-probe"} <= set(result)


@pytest.mark.slow
def test_demo_quick_writes_the_comparison_hit_rates_figures_and_adapter(tmp_path, one_thread):
    from types import SimpleNamespace

    from e2_adapter.demo import run
    results = run(SimpleNamespace(quick=True, seed=0, out=str(tmp_path)))
    assert set(results) == {"clip-ft", "e2"}
    table = (tmp_path / "results.md").read_text()
    assert "| clip-ft |" in table and "| e2 |" in table
    assert "E2's brand tokens pick a patch on the brand region" in table and "picks at random" in table
    for name in ("metrics.png", "selections.png", "results.json", "e2/best/adapter", "e2/final", "clip-ft/final"):
        assert (tmp_path / name).exists(), name
