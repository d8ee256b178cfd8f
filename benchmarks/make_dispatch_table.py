"""Write the measured dispatch table for `auto` from benchmark rows of one GPU:
  - for each T bucket, the backend (triton or cuda) with the lower mean ratio to base over the shapes of that
    bucket (dense gates), in the chosen mode;
  - "topk_grouped_above": the grouped-vs-dense rule for top-k gates (grouped when E * r > value * k), from rows
    of the `topk` preset with a backend's grouped provider ("triton", "cuda", run under
    PERSONAFUSE_TOPK_PATH=grouped) beside its "-dense" provider.

    python benchmarks/make_dispatch_table.py bench/rows.json [bench_topk/rows.json] [--mode fwdbwd] [--out DIR]
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


def topk_threshold(rows, mode: str, backends=("triton", "cuda")):
    """The largest E * r / k at which the dense path still won (grouped above it), 0 if grouped always won, or
    None without paired rows. A shape counts when both providers of some backend ran it; the mean over backends
    decides."""
    by_shape = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("mode") != mode or not r.get("top_k") or "error" in r:
            continue
        name = r["provider"]
        backend = name.removesuffix("-dense")
        if backend in backends:
            key = (r["E"], r["r"], r["top_k"], r["T"], r["K"], r["N"])
            by_shape[key][backend]["dense" if name.endswith("-dense") else "grouped"] = r["ratio_to_base"]
    dense_wins, seen = [], False
    for (E, rank, k, *_), per_backend in by_shape.items():
        pairs = [v for v in per_backend.values() if {"dense", "grouped"} <= v.keys()]
        if not pairs:
            continue
        seen = True
        grouped = sum(v["grouped"] for v in pairs) / len(pairs)
        dense = sum(v["dense"] for v in pairs) / len(pairs)
        if dense <= grouped:
            dense_wins.append(E * rank / k)
    if not seen:
        return None
    return max(dense_wins) if dense_wins else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="+", help="rows.json files of one GPU")
    ap.add_argument("--mode", default="fwdbwd")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [row for path in args.rows for row in json.loads(Path(path).read_text())]
    devices = {r["device"] for r in rows}
    if len(devices) != 1 or next(iter(devices)).startswith("cpu"):
        sys.exit(f"make_dispatch_table: rows must come from one GPU, got {sorted(devices)}")
    table = choose(rows, args.mode)
    threshold = topk_threshold(rows, args.mode)
    if threshold is not None:
        table["topk_grouped_above"] = threshold
    print(json.dumps(table, indent=1))
    if args.out:
        path = Path(args.out) / (next(iter(devices)).replace(" ", "_") + ".json")
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
