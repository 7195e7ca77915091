"""Retrieval evaluation on big catalogues: time and peak memory against the gallery size.

    python benchmarks/eval_scale.py --sizes 10000 30000 100000 --threads 1 [--dim 512] [--no-faiss]

Every (size, protocol, backend) runs in a fresh process, so its peak resident memory (ru_maxrss) is its
own. product-full: N products, one image and one text each (N x N both ways). image-full: N images of
N/2 products (2 views each) against the N/2 product texts. Embeddings are random, with each text a noisy
copy of its product's image so the recalls are neither 0 nor 100 and the two backends can be compared.
Prints a markdown table: seconds, peak memory of the whole process, peak above the inputs, and growth
of time and memory from the previous size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROTOCOLS = ("product-full", "image-full")
VIEWS = 2  # image-full: images per product


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(size: int, protocol: str, backend: str, dim: int, threads: int, noise: float = 2.0, seed: int = 0) -> dict:
    """One measurement, in this process (the parent runs each in a child)."""
    import torch
    from e2_adapter.evaluation.retrieval import image_full, product_full
    torch.set_num_threads(threads)
    if backend == "faiss":
        import faiss
        faiss.omp_set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    products = size if protocol == "product-full" else size // VIEWS
    look = torch.randn(products, dim, generator=g)
    text = look + noise * torch.randn(products, dim, generator=g)
    if protocol == "product-full":
        image = look + noise * torch.randn(products, dim, generator=g)
        owners = None
    else:
        owners = torch.arange(products).repeat_interleave(VIEWS)
        image = look[owners] + noise * torch.randn(len(owners), dim, generator=g)
    del look
    inputs_mb = rss_mb()
    tic = time.perf_counter()
    if protocol == "product-full":
        result = product_full(image, text, use_faiss=backend == "faiss")
    else:
        result = image_full(image, owners, text, torch.arange(products), use_faiss=backend == "faiss")
    seconds = time.perf_counter() - tic
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "protocol": protocol, "backend": backend, "dim": dim, "seconds": seconds,
            "peak_mb": peak_mb, "inputs_mb": inputs_mb, "SumR": result["SumR"], "t2i_R1": result["t2i_R1"]}


def run_child(args, size: int, protocol: str, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--one", str(size), protocol, backend, "--dim", str(args.dim),
           "--threads", str(args.threads), "--noise", str(args.noise)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def growth_table(rows: list[dict]) -> str:
    """Markdown; growth columns compare each row with the previous size of the same protocol and backend."""
    lines = ["| protocol | backend | N | seconds | peak MB | peak above inputs MB | time growth | memory growth "
             "(above inputs) | SumR |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    previous: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: (r["protocol"], r["backend"], r["size"])):
        key = (r["protocol"], r["backend"])
        above = r["peak_mb"] - r["inputs_mb"]
        before = previous.get(key)
        if before:
            factor = r["size"] / before["size"]
            time_growth = f"x{r['seconds'] / before['seconds']:.1f} for x{factor:.1f} N"
            mem_growth = f"x{above / max(before['peak_mb'] - before['inputs_mb'], 1e-9):.2f}"
        else:
            time_growth = mem_growth = "-"
        lines.append(f"| {r['protocol']} | {r['backend']} | {r['size']:,} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                     f"{above:.0f} | {time_growth} | {mem_growth} | {r['SumR']:.1f} |")
        previous[key] = r
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--noise", type=float, default=2.0,
                   help="std of the noise on each image and text around its product's direction (2.0 at dim 512: "
                        "R@1 well below 100 at 100k)")
    p.add_argument("--no-faiss", action="store_true", help="the exact torch path only")
    p.add_argument("--json", help="also write the rows here (rewritten after each measurement)")
    p.add_argument("--table-from", help="print the table of a --json file and exit")
    p.add_argument("--one", nargs=3, metavar=("SIZE", "PROTOCOL", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            print(growth_table(json.load(f)))
        return
    if args.one:
        size, protocol, backend = args.one
        print(json.dumps(measure(int(size), protocol, backend, args.dim, args.threads, args.noise)))
        return
    if min(args.sizes) < 2 * VIEWS:
        raise SystemExit(f"--sizes must be at least {2 * VIEWS}")
    backends = ["exact"]
    if not args.no_faiss:
        try:
            import faiss  # noqa: F401
            backends.append("faiss")
        except ImportError:
            print("faiss is not installed (pip install faiss-cpu): timing the exact path only", file=sys.stderr)
    rows = []
    for size in args.sizes:
        for protocol in args.protocols:
            for backend in backends:
                rows.append(run_child(args, size, protocol, backend))
                r = rows[-1]
                print(f"{protocol} {backend} N={size}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
                if args.json:  # after every row: a long run stopped early keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print(f"dim {args.dim}, noise {args.noise}, {args.threads} thread(s)\n")
    print(growth_table(rows))


if __name__ == "__main__":
    main()
