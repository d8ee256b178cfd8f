"""Write the measured dispatch table for `auto` from benchmark rows: for each T bucket, the backend (triton or
cuda) with the lower mean ratio to base over the shapes of that bucket, in the chosen mode.

    python benchmarks/make_dispatch_table.py results/run/rows.json [--mode fwdbwd] [--out personafuse_kernels/ops/dispatch_tables]
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from personafuse_kernels.dispatch import token_bucket  # noqa: E402


def choose(rows, mode: str, candidates=("triton", "cuda")) -> dict:
    ratios = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("mode") == mode and r.get("provider") in candidates and "error" not in r and not r.get("top_k"):
            bucket = token_bucket(r["T"])
            ratios[bucket][r["provider"]].append(r["ratio_to_base"])
    table = {}
    for bucket, by in sorted(ratios.items()):
        means = {p: sum(v) / len(v) for p, v in by.items() if v}
        if means:
            table[f"T<={bucket}"] = min(means, key=means.get)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows")
    ap.add_argument("--mode", default="fwdbwd")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.rows).read_text())
    devices = {r["device"] for r in rows}
    if len(devices) != 1 or next(iter(devices)).startswith("cpu"):
        sys.exit(f"make_dispatch_table: rows must come from one GPU, got {sorted(devices)}")
    table = choose(rows, args.mode)
    print(json.dumps(table, indent=1))
    if args.out:
        path = Path(args.out) / (next(iter(devices)).replace(" ", "_") + ".json")
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
