"""Kill `e2-adapter train` at random moments, resume it, and check it ends bit for bit where an
uninterrupted run ends.

The unit tests kill training at chosen points (a step in stage 1, one in stage 2, half-way through a
checkpoint write). This script draws the moments at random, so kills also land where nobody thought
to put one: inside the optimiser step, between the temporary file and its rename, while the tag
cache is built, during evaluation. Each trial trains a tiny model with a checkpoint every step,
SIGKILLs the process at a uniformly random time after training starts (up to ``--kills`` times),
resumes it each time the way a user would (``--resume``; ``--overwrite`` when no checkpoint was
written yet), lets the last attempt finish and compares every weight of the final checkpoint, and
the steps logged, with the uninterrupted reference.

    python benchmarks/fault_injection.py --trials 20 --out runs/faults

Prints one JSON line per trial and a summary; exits 1 if any trial differs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

RECIPE = ["--family", "open_clip", "--model", "tiny", "--batch-size", "16", "--stage1-steps", "6",
          "--stage2-steps", "6", "--warmup-steps", "2", "--checkpoint-every", "1", "--log-every", "1"]


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "e2_adapter.cli", "train", "--train", str(data / "fashionsynth_train.h5"),
            "--val", str(data / "fashionsynth_validation.h5"), "--out", str(out), *RECIPE, *extra]


def environment() -> dict[str, str]:
    # One thread in every process: bit-exact resumption needs the same reduction order each time.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def wait_for_training(out: Path, process: subprocess.Popen, timeout: float = 300) -> bool:
    """Block until this process has written the run's config (training starts right after) or it ends.
    A resumed run's folder already holds the config of the killed attempt: only a newer one counts."""
    started, deadline = time.time(), time.monotonic() + timeout
    config = out / "train_config.json"
    while time.monotonic() < deadline and process.poll() is None:
        if config.is_file() and config.stat().st_mtime >= started - 0.01:
            return True
        time.sleep(0.02)
    return process.poll() is None


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], list[int]]:
    checkpoint = torch.load(out / "checkpoint_last.pt", weights_only=True, map_location="cpu")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return checkpoint["model"], [r["step"] for r in rows if "step" in r]


def where_it_died(out: Path) -> str:
    """What the kill left: the step of the last checkpoint, and whether a write was cut short."""
    path = out / "checkpoint_last.pt"
    step = torch.load(path, weights_only=True)["state"]["step"] if path.is_file() else None
    torn = bool(list(out.glob(".*.tmp")) + list(out.glob("best/.*.tmp")) + list(out.glob("best/adapter/.*.tmp")))
    return f"checkpoint step {step}" + (", a write cut short" if torn else "")


def run_trial(data: Path, out: Path, kills: int, train_seconds: float, rng: random.Random) -> dict:
    events, resume = [], None
    for attempt in range(kills + 1):
        extra = [] if resume is None else [resume]
        process = subprocess.Popen(train_command(data, out, *extra), env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last, delay = attempt == kills, None
        if not last and wait_for_training(out, process):
            delay = rng.uniform(0, train_seconds)
            time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        if process.returncode == -signal.SIGKILL:
            events.append(f"killed {delay:.1f} s into training: {where_it_died(out)}")
            resume = "--resume" if (out / "checkpoint_last.pt").is_file() else "--overwrite"
            continue
        if process.returncode != 0:
            return {"events": events, "error": err.strip().splitlines()[-1:]}
        if delay is not None:
            events.append(f"finished before the kill drawn at {delay:.1f} s")
        break  # nothing more to resume
    return {"events": events}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/faults")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kills", type=int, default=2, help="kills per trial (each resumed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not (data / "fashionsynth_train.h5").is_file():
        from e2_adapter.data import write_fashionsynth
        write_fashionsynth(data, products=64, val_products=16, image_size=32, seed=0)

    # The reference runs on every invocation: its duration, under this moment's load, is the window
    # the kill times are drawn from (a stale, longer one would let most runs finish before the kill).
    reference = out / "reference"
    shutil.rmtree(reference, ignore_errors=True)  # its old train_config.json would start the clock early
    process = subprocess.Popen(train_command(data, reference), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_training(reference, process)
    started = time.monotonic()
    if process.wait() != 0:
        raise SystemExit(f"the reference run failed: {process.stderr.read()}")
    train_seconds = time.monotonic() - started
    expected_weights, expected_steps = final_state(reference)

    rng, results = random.Random(args.seed), []
    for trial in range(args.trials):
        folder = out / f"trial-{args.seed}-{trial}"
        result = run_trial(data, folder, args.kills, train_seconds, rng)
        if "error" not in result:
            weights, steps = final_state(folder)
            differ = [k for k in expected_weights if not torch.equal(expected_weights[k], weights[k])]
            result.update(identical=not differ and steps == expected_steps, weights_differing=len(differ),
                          steps_logged_as_reference=steps == expected_steps)
        results.append({"trial": trial, **result})
        print(json.dumps(results[-1]), flush=True)

    kills = sum(e.startswith("killed") for r in results for e in r["events"])
    torn = sum("cut short" in e for r in results for e in r["events"])
    identical = sum(bool(r.get("identical")) for r in results)
    summary = {"trials": len(results), "trials_killed": sum(any(e.startswith("killed") for e in r["events"]) for r in results), "kills": kills,
               "kills_during_a_write": torn, "identical_to_uninterrupted": identical,
               "reference_train_seconds": round(train_seconds, 2)}
    print(json.dumps(summary))
    (out / f"summary-{args.seed}.json").write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    sys.exit(0 if identical == len(results) else 1)


if __name__ == "__main__":
    main()
