"""Serving recipe: one batch of requests, each with its own persona mix, a single persona, or no adapter, over
unequal prompt lengths, through a small Llama carrying E persona adapters (made by peft, routed by this package).

It checks that the batched routed model computes what per-request merging and peft's mixed-adapter batch compute,
then prints prefill throughput for each and the ratio to the base model measured in the same run, and writes
rows.json (and serving.png with matplotlib).

    python python/serving.py                              # CPU, a few seconds
    python python/serving.py --device cuda --dtype bfloat16 --requests 64 --hidden 1024 --max-len 512
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from personafuse_kernels.bench.serving import format_rows, plot_serving, run_serving


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="personafuse-serving")
    args = ap.parse_args(argv)
    if args.requests < 3 or not 1 <= args.min_len <= args.max_len:
        ap.error("need --requests >= 3 (one of each kind) and 1 <= --min-len <= --max-len")
    rows = run_serving(args.requests, args.experts, args.rank, args.hidden, args.layers, min_len=args.min_len,
                       max_len=args.max_len, device=args.device, dtype=getattr(torch, args.dtype),
                       repeats=args.repeats)
    print(format_rows(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    try:
        print(f"plot: {plot_serving(rows, out / 'serving.png')}")
    except ImportError:
        print("plot: skipped (matplotlib is not installed: pip install 'personafuse-kernels[bench]')")
    print(f"rows: {out / 'rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
