"""onnxruntime vs PyTorch CPU latency of the image encoder (E2's global + regions + selections).

    python benchmarks/onnx_latency.py --checkpoint runs/e2/best --batch 32 --repeats 10 --threads 1
    python benchmarks/onnx_latency.py --family open_clip --model ViT-B-32 --wrap --batch 32   # random init

Exports to a temporary folder, checks parity (max abs diff, selections), then times both runtimes
interleaved on the same batch and prints the median per-round latency ratio onnxruntime / PyTorch.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import e2_adapter
from e2_adapter.export import IMAGE_FILE, export_onnx
from e2_adapter.loading import add_encoder_flags, load_encoder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_flags(p, default_model="tiny")
    p.add_argument("--wrap", action="store_true", help="wrap a plain model with E2 (default preset) first")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    bundle = load_encoder(args)
    if args.wrap and not e2_adapter.is_wrapped(bundle.model):
        e2_adapter.wrap(bundle.model)
    model = bundle.model.eval()
    pixels = torch.rand(args.batch, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(bundle, tmp)
        session = ort.InferenceSession(str(Path(tmp) / IMAGE_FILE), options, providers=["CPUExecutionProvider"])

    def run_torch():
        with torch.no_grad():
            if e2_adapter.is_wrapped(model):
                return e2_adapter.encode_image_regions(model, pixels)
            return e2_adapter.get_backend(model).encode_image(pixels)

    def run_onnx():
        return session.run(None, {"pixels": pixels.numpy()})

    ref, got = run_torch(), run_onnx()
    ref_image = ref.image if e2_adapter.is_wrapped(model) else ref
    diff = float(abs(got[0] - ref_image.numpy()).max())
    same = bool((got[2] == ref.selections.numpy()).all()) if e2_adapter.is_wrapped(model) else None
    torch_ms, onnx_ms, ratios = [], [], []
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
        t = time.perf_counter(); run_torch(); a = (time.perf_counter() - t) * 1e3
        t = time.perf_counter(); run_onnx(); b = (time.perf_counter() - t) * 1e3
        torch_ms.append(a); onnx_ms.append(b); ratios.append(b / a)
    result = {"batch": args.batch, "threads": args.threads, "max_abs_diff": diff, "same_selections": same,
              "pytorch_ms": statistics.median(torch_ms), "onnxruntime_ms": statistics.median(onnx_ms),
              "ratio": statistics.median(ratios)}
    print("| batch | threads | max abs diff | same selections | PyTorch ms | onnxruntime ms | ratio (median per round) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.batch} | {args.threads} | {diff:.2e} | {same} | {result['pytorch_ms']:.1f} | "
          f"{result['onnxruntime_ms']:.1f} | {result['ratio']:.3f} |")
    return result


if __name__ == "__main__":
    main()
