"""Which of open_clip's models can E2 wrap? Every name in ``open_clip.list_models()``, checked for real.

For each model the whole CLIP is built on the ``meta`` device (shapes only, no memory) and wrapped
there with the default preset: every check ``wrap`` makes and the adapter it builds, for any size.
Then, for image towers up to ``--max-vision-params``, only the image tower is given memory
(``to_empty`` on the CPU, filled with small random numbers: the check is about structure, not
weights; the text tower stays on ``meta``), wrapped again from those weights, one image at the
model's own size goes through ``encode_image`` (a finite [1, D] embedding) and ``unwrap`` runs. A
refusal is recorded with the error the user would see; anything else that goes wrong is recorded as
a failure, which is what this script exists to find.

    python benchmarks/family_coverage.py --out benchmarks/results/family_coverage
    python benchmarks/family_coverage.py --models ViT-B-32 RN50 --no-forward

Writes ``coverage.jsonl`` (one line per model, appended as each finishes, so a stopped run resumes
where it stopped) and ``coverage.md`` (the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import e2_adapter
from e2_adapter.backends.base import UnsupportedModelError


def image_size(visual) -> int:
    size = getattr(visual, "image_size", None)
    if size is None:  # open_clip TimmModel keeps it on the timm trunk's patch embedding
        size = getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None), "img_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _wrap(model) -> dict | None:
    """None when wrapped; else the row fields saying why not."""
    try:
        e2_adapter.wrap(model)
    except UnsupportedModelError as e:
        return {"result": "refused", "reason": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - what this script exists to find
        return {"result": "FAILED", "reason": f"wrap: {type(e).__name__}: {e}"[:300]}
    return None


def check(name: str, forward: bool, max_vision_params: float) -> dict:
    import open_clip
    row = {"model": name}
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            model = open_clip.create_model(name, pretrained=None, device="meta")
        except Exception as e:  # noqa: BLE001 - an open_clip config this open_clip cannot build
            return {**row, "result": "not built", "reason": f"open_clip: {type(e).__name__}: {e}"[:300]}
        visual = model.visual
        row["tower"] = type(visual).__name__ + (f" ({type(visual.trunk).__name__})" if hasattr(visual, "trunk") else "")
        row["vision_params_M"] = round(sum(p.numel() for p in visual.parameters()) / 1e6, 1)
        # 1. on meta: wrap's checks and layout, for every size
        failed = _wrap(model)
        if failed:
            return {**row, **failed}
        row["e2_params_M"] = round(e2_adapter.count_parameters(model)["adapter"] / 1e6, 2)
        e2_adapter.unwrap(model)
        if not forward or row["vision_params_M"] > max_vision_params:
            return {**row, "result": "wrapped on meta", "reason": "not run: " + (
                "--no-forward" if not forward else f"over --max-vision-params {max_vision_params:g}M")}
        # 2. with memory: wrap from real (random) weights, one image through, unwrap
        visual.to_empty(device="cpu")
        for p in visual.parameters():
            p.normal_(0, 0.02)
        for b in visual.buffers():  # uninitialised memory could hold NaN
            if b.is_floating_point():
                b.zero_()
        failed = _wrap(model)
        if failed:
            return {**row, **failed}
        try:
            model.eval()
            size = image_size(visual)
            out = model.encode_image(torch.randn(1, 3, size, size))
            if out.ndim != 2 or out.shape[0] != 1 or not torch.isfinite(out).all():
                return {**row, "result": "FAILED", "reason": f"encode_image gave {tuple(out.shape)}, finite="
                        f"{bool(torch.isfinite(out).all())}"}
            row["image_size"], row["embed_dim"] = size, int(out.shape[-1])
            e2_adapter.unwrap(model)
        except Exception as e:  # noqa: BLE001
            return {**row, "result": "FAILED", "reason": f"encode_image / unwrap: {type(e).__name__}: {e}"[:300]}
    return {**row, "result": "wrapped and run", "seconds": round(time.perf_counter() - t0, 1)}


def render(rows: list[dict]) -> str:
    counts = {}
    for r in rows:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    lines = [f"{len(rows)} open_clip models: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "",
             "| model | image tower | vision params (M) | result | E2 params (M) / reason |", "|---|---|---|---|---|"]
    for r in rows:
        detail = r.get("e2_params_M", "") if r["result"] == "wrapped and run" else r.get("reason", "")
        lines.append(f"| {r['model']} | {r.get('tower', '')} | {r.get('vision_params_M', '')} | {r['result']} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import open_clip
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/family_coverage"))
    p.add_argument("--models", nargs="+", help="default: every name in open_clip.list_models()")
    p.add_argument("--no-forward", action="store_true", help="wrap and unwrap only, no encode_image")
    p.add_argument("--max-vision-params", type=float, default=500,
                   help="millions; larger image towers are wrapped on meta only, not run (default: 500)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "coverage.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["model"]] = r
    names = args.models or open_clip.list_models()
    for name in names:
        if name in done:
            continue
        row = check(name, forward=not args.no_forward, max_vision_params=args.max_vision_params)
        done[name] = row
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['result']} {row.get('reason', '')[:120]}", flush=True)
    rows = [done[n] for n in names]
    (args.out / "coverage.md").write_text(render(rows))
    print(render(rows))
    return 1 if any(r["result"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
