"""A short check for a machine with a CUDA GPU (a few minutes), prepared on a CPU-only machine.

    python benchmarks/gpu_check.py [--out runs/gpu_check.json]

1. fp16 weights as ``clip.load`` returns them on CUDA (OpenAI ViT-B/32, random init, ``convert_weights``):
   wrapped (E2's parameters must follow fp16), encoded, then trained a few steps by the project's Trainer
   with fp16 AMP on a small FashionSynth.
2. bf16: the same Trainer steps with ``--amp bf16`` (open_clip ViT-B/32, fp32 weights).
3. Encode latency at batch 256, unwrapped vs wrapped, ViT-B/32 and ViT-B/16 (open_clip, random init,
   fp16 autocast), interleaved in one run; the ratio of medians, and peak GPU memory of each.
4. A 1-GPU ``torchrun`` training run through the command line.

Each check reports ok / FAILED with its error; the exit status is 1 when any failed. Without CUDA it
prints why it skipped and exits 0, so CPU-only CI can run it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SKIP_MESSAGE = "gpu_check: skipped, no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run"


def synth_data(folder: Path, image_size: int) -> tuple[str, str]:
    from e2_adapter.data import write_fashionsynth
    train, val = write_fashionsynth(folder, products=48, val_products=16, seed=0, image_size=image_size)
    return str(train), str(val)


def train_steps(model, family: str, tokenizer, transform, data: tuple[str, str], amp: str, out: Path) -> dict:
    """The project's Trainer, 2 + 2 steps at batch 16: the losses it logged and its peak memory."""
    from e2_adapter.data import FashionGenH5
    from e2_adapter.training.config import TrainConfig
    from e2_adapter.training.trainer import Trainer
    cfg = TrainConfig(batch_size=16, stage1_steps=2, stage2_steps=2, warmup_steps=1, amp=amp, log_every=1,
                      device="cuda", eval_every=0)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model, tokenizer, transform, FashionGenH5(data[0]), None, cfg, out, family, progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not losses or not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        raise RuntimeError(f"losses not finite: {losses}")
    return {"losses": losses, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def openai_vit_b32_fp16():
    """clip.model.CLIP with ViT-B/32's shape, fp16 as clip.load builds it on CUDA."""
    from clip.model import CLIP, convert_weights
    model = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                 context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                 transformer_layers=12)
    convert_weights(model)
    return model.cuda().eval()


def check_fp16_weights(tmp: Path) -> dict:
    import clip
    import e2_adapter
    from e2_adapter.zoo import clip_transform
    model = openai_vit_b32_fp16()
    e2_adapter.wrap(model)
    dtypes = {str(p.dtype) for p in e2_adapter.get_adapter(model).parameters()}
    if dtypes != {"torch.float16"}:
        raise RuntimeError(f"E2's parameters are {dtypes}, expected float16 like the model")
    with torch.no_grad():
        emb = model.encode_image(torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float16))
    if emb.dtype != torch.float16 or not torch.isfinite(emb).all():
        raise RuntimeError(f"encode_image gave {emb.dtype}, finite={bool(torch.isfinite(emb).all())}")
    model = e2_adapter.unwrap(model)  # the Trainer wraps it itself
    result = train_steps(model, "openai", lambda t: clip.tokenize(t, context_length=77, truncate=True),
                         clip_transform(224), synth_data(tmp / "data224", 224), "fp16", tmp / "fp16")
    return {"adapter_dtype": "float16", **result}


def check_bf16(tmp: Path) -> dict:
    from e2_adapter.zoo import create_clip
    bundle = create_clip("open_clip", "ViT-B-32", device="cuda")
    return train_steps(bundle.model, "open_clip", bundle.tokenizer, bundle.preprocess,
                       synth_data(tmp / "data224", 224), "bf16", tmp / "bf16")


def timed_encode(model, images, repeats: int) -> list[float]:
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(repeats):
            torch.cuda.synchronize()
            tic = time.perf_counter()
            model.encode_image(images)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
    return times


def check_latency(model_name: str, batch: int = 256, rounds: int = 5, repeats: int = 5) -> dict:
    import e2_adapter
    from e2_adapter.zoo import create_clip
    model = create_clip("open_clip", model_name, device="cuda").model.eval()
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    timed_encode(model, images, 3)  # warm-up: cuDNN/cuBLAS choices, allocator
    times = {"unwrapped": [], "wrapped": []}
    peak = {}
    for _ in range(rounds):  # interleaved, so drifts in clock or load hit both alike
        for kind in ("unwrapped", "wrapped"):
            if kind == "wrapped":
                e2_adapter.wrap(model)
            torch.cuda.reset_peak_memory_stats()
            times[kind] += timed_encode(model, images, repeats)
            peak[kind] = torch.cuda.max_memory_allocated() / 2**20
            if kind == "wrapped":
                model = e2_adapter.unwrap(model)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"batch": batch, "unwrapped_ms": med["unwrapped"], "wrapped_ms": med["wrapped"],
            "ratio": med["wrapped"] / med["unwrapped"], "peak_gpu_mb": peak}


def check_torchrun(tmp: Path) -> dict:
    train, val = synth_data(tmp / "data32", 32)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "e2_adapter.cli", "train", "--family", "open_clip", "--model", "tiny", "--train", train,
           "--val", val, "--batch-size", "16", "--stage1-steps", "2", "--stage2-steps", "2",
           "--warmup-steps", "1", "--out", str(tmp / "torchrun")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    if run.returncode != 0:
        raise RuntimeError(f"torchrun exited {run.returncode}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    results, failed = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}, []
    checks = {"fp16_weights_amp_train": check_fp16_weights, "bf16_train": check_bf16,
              "latency_ViT-B-32": lambda tmp: check_latency("ViT-B-32"),
              "latency_ViT-B-16": lambda tmp: check_latency("ViT-B-16"),
              "torchrun_1_gpu": check_torchrun}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in checks.items():
            tic = time.perf_counter()
            try:
                results[name] = {"ok": True, **check(Path(tmp))}
            except Exception as err:  # report every check, then fail at the end
                results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                 "traceback": traceback.format_exc()[-3000:]}
                failed.append(name)
            results[name]["seconds"] = time.perf_counter() - tic
            print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
                  f"({results[name]['seconds']:.1f} s)", flush=True)
            torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict) or "traceback" not in v},
                     indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
