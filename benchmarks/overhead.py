"""What E2 costs: parameters added and image-encoding latency, wrapped vs. unwrapped.

For each open_clip model (random init: weights do not change either number) and each preset, counts
E2's parameters (total and split into selection tokens, fusion blocks, region heads) as a share of
the whole base CLIP (both towers, as the paper's 1.9% for ViT-B/32 counts), and times
``encode_image`` of the wrapped model against an unwrapped deepcopy of the same weights: eval mode,
``torch.inference_mode``, one warm-up pass each, then ``--repeats`` rounds in which every variant
runs once, in an order that rotates each round (so drift of a shared machine hits all alike);
reported is the median per variant. Also counts the FLOPs of one image's ``encode_image`` for each
variant (torch's FlopCounterMode): the load-independent expectation for the latency ratio. Prints a
markdown table and the machine; ``--json`` keeps every timed round, ``--render`` re-prints a saved run.

    python benchmarks/overhead.py                       # ViT-B-32, ViT-B-16, ViT-B-16-SigLIP; every preset
    python benchmarks/overhead.py --models ViT-B-16-SigLIP --no-timing   # parameters and FLOPs only
    python benchmarks/overhead.py --models ViT-B-32 --batch 8 --repeats 3 --threads 2
    python benchmarks/overhead.py --device cuda --json overhead.json

Goals from the issue: latency ratio <= 1.08 (ViT-B/32), <= 1.05 (ViT-B/16); lean <= 1.9% parameters.
A tower that pools over its patches (ViT-B-16-SigLIP's MAP head) takes only the gated layout (wrap
refuses the presets that drop the patches), so its other presets are skipped.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import e2_adapter

GOALS = {"latency": {"ViT-B-32": 1.08, "ViT-B-16": 1.05}, "lean_params_pct": 1.9}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    import open_clip
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version()}


def parameter_report(wrapped: torch.nn.Module) -> dict:
    c = e2_adapter.count_parameters(wrapped)
    base = c["total"] - c["adapter"]
    vision = sum(p.numel() for n, p in wrapped.visual.named_parameters() if not n.startswith("e2."))
    pct = lambda n: 100 * n / base
    return {"base": base, "base_vision": vision, "added": c["adapter"], "added_pct": pct(c["adapter"]),
            "added_pct_of_vision": 100 * c["adapter"] / vision,
            **{k: c[k] for k in ("tokens", "fusion", "heads")},
            **{f"{k}_pct": pct(c[k]) for k in ("tokens", "fusion", "heads")}}


def image_flops(model: torch.nn.Module, size: int, device) -> int:
    """FLOPs of ``encode_image`` for one image (a multiply-add counts 2), by torch's FlopCounterMode.
    Counted with autograd on (under inference_mode nn.MultiheadAttention takes its fused fast path) and
    with scaled_dot_product_attention forced onto its math kernel: the counter sees no FLOPs in the
    fused CPU kernels (timm's and transformers' attention, and open_clip's attention product), so
    without it the attention of every token, E2's included, went uncounted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, size, size, device=device)
    with sdpa_kernel([SDPBackend.MATH]), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(x)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants: dict[str, torch.nn.Module], images: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Median ms of ``encode_image`` per variant, measured interleaved in rotating order.
    ``all_ms[r]`` is round r's time, so variants can be compared round by round (paired)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up (allocator, kernels' first calls)
            variants[n].encode_image(images)
        _sync(images.device)
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                start = time.perf_counter()
                variants[n].encode_image(images)
                _sync(images.device)
                times[n].append(1000 * (time.perf_counter() - start))
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "all_ms": t}
            for n, t in times.items()}


def run(models, presets, batch: int, repeats: int, device: str = "cpu", log=print, timing: bool = True) -> list[dict]:
    import open_clip
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = open_clip.create_model(name, pretrained=None, device=device).eval()
        size = base.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        variants = {"unwrapped": base}
        reports = {}
        pools = e2_adapter.get_backend(base).pools_patches
        for preset in presets:
            if pools and preset != "gated":
                log(f"[{name}] {preset}: skipped (the tower pools over its patches: only the gated layout applies)")
                continue
            wrapped = e2_adapter.wrap(copy.deepcopy(base), preset=preset).eval()
            variants[preset] = wrapped
            reports[preset] = parameter_report(wrapped)
        torch.manual_seed(1)
        images = torch.randn(batch, 3, size, size, device=device)
        flops = {n: image_flops(v, size, device) for n, v in variants.items()}
        if timing:
            log(f"[{name}] timing {list(variants)} at batch {batch}, {repeats} repeats ...")
            times = time_variants(variants, images, repeats)
        else:  # parameters and FLOPs only
            times = {n: {"median_ms": None, "all_ms": []} for n in variants}
        for preset in reports:
            row = {"model": name, "preset": preset, "batch": batch, "repeats": repeats, **reports[preset],
                   "unwrapped_gflops": flops["unwrapped"] / 1e9, "wrapped_gflops": flops[preset] / 1e9,
                   "flop_ratio": flops[preset] / flops["unwrapped"],
                   "unwrapped_ms": times["unwrapped"]["median_ms"], "wrapped_ms": times[preset]["median_ms"],
                   "unwrapped_all_ms": times["unwrapped"]["all_ms"], "wrapped_all_ms": times[preset]["all_ms"]}
            summarise(row)
            rows.append(row)
        del variants, base
    return rows


def summarise(row: dict) -> dict:
    """The headline ratio (of the medians) and two views that are steadier on a shared machine:
    the ratio of the fastest runs, and the median of the per-round (adjacent in time) ratios."""
    u, w = row["unwrapped_all_ms"], row["wrapped_all_ms"]
    if not u:  # not timed (--no-timing)
        row["ratio"] = row["ratio_min"] = row["ratio_paired"] = None
        return row
    row["ratio"] = row["wrapped_ms"] / row["unwrapped_ms"]
    row["ratio_min"] = min(w) / min(u)
    row["ratio_paired"] = statistics.median(b / a for a, b in zip(u, w))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | params added | % of base CLIP | split: tokens / fusion / heads (% of base) "
             "| GFLOPs/img unwrapped -> wrapped (ratio) | unwrapped ms | wrapped ms | ratio "
             "| (ratio of minima; median paired ratio) |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        split = (f"{r['tokens']:,} / {r['fusion']:,} / {r['heads']:,} "
                 f"({r['tokens_pct']:.3f} / {r['fusion_pct']:.2f} / {r['heads_pct']:.2f})")
        timed = (f"{r['unwrapped_ms']:.0f} | {r['wrapped_ms']:.0f} | {r['ratio']:.3f} | "
                 f"({r['ratio_min']:.3f}; {r['ratio_paired']:.3f}) |") if r["ratio"] is not None else "- | - | - | - |"
        lines.append(f"| {r['model']} | {r['preset']} | {r['added']:,} | {r['added_pct']:.2f}% | {split} | "
                     f"{r['unwrapped_gflops']:.2f} -> {r['wrapped_gflops']:.2f} ({r['flop_ratio']:.3f}) | " + timed)
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        goal = GOALS["latency"].get(r["model"])
        if goal is not None and r["ratio"] is not None:
            out.append(f"- {r['model']} {r['preset']}: latency ratio {r['ratio']:.3f} "
                       f"(goal <= {goal}: {'met' if r['ratio'] <= goal else 'NOT met'})")
        if r["preset"] == "lean":
            g = GOALS["lean_params_pct"]
            out.append(f"- {r['model']} lean: {r['added_pct']:.2f}% parameters "
                       f"(goal <= {g}%: {'met' if r['added_pct'] <= g else 'NOT met'})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16", "ViT-B-16-SigLIP"],
                   help="open_clip model names")
    p.add_argument("--presets", nargs="+", default=list(e2_adapter.PRESETS), choices=list(e2_adapter.PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--no-timing", action="store_true", help="count parameters and FLOPs only")
    p.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    p.add_argument("--render", default=None, metavar="JSON", help="print the table of a saved --json run, measure nothing")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        report(saved["rows"], saved["machine"], argparse.Namespace(**saved["args"]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    rows = run(args.models, args.presets, args.batch, args.repeats, args.device, log=log,
               timing=not args.no_timing)
    report(rows, info, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


def report(rows: list[dict], info: dict, args) -> None:
    rows = [summarise(dict(r)) for r in rows]
    print(markdown(rows))
    print()
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    print(f"Machine: {info['cpu']}, {info['cores']} cores visible, torch {info['torch']} "
          f"({info['torch_threads']} threads){gpu}, open_clip {info['open_clip']}, Python {info['python']}. "
          f"Device {getattr(args, 'device', 'cpu')}, batch {args.batch}, median of {args.repeats} interleaved "
          "repeats after 1 warm-up, eval + torch.inference_mode, fp32, random init.")
    print("Parameter % = E2's parameters / all parameters of the unwrapped CLIP (image + text towers); "
          "of the image tower alone: " + ", ".join(f"{r['model']} {r['preset']} {r['added_pct_of_vision']:.2f}%"
                                                   for r in rows) + ".")
    print("Ratio = median wrapped / median unwrapped (the headline); in brackets, two other views of the same "
          "runs: fastest / fastest, and the median of the per-round ratios. GFLOPs: encode_image of one image, "
          "counted by torch.utils.flop_counter (multiply-add = 2), independent of the machine's load.")
    print()
    print("\n".join(goal_lines(rows)))


if __name__ == "__main__":
    sys.exit(main())
