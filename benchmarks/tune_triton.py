"""Offline tuning of the Triton backend's launch configs: writes the per-GPU, per-op tables the launchers read
(personafuse_kernels/ops/triton_configs/<GPU name>/<op>.json, keyed "T<=bucket"; ops/launch_configs.py).
Nothing is tuned on the hot path.

    python benchmarks/tune_triton.py --out personafuse_kernels/ops/triton_configs     # on the GPU to tune for
    python benchmarks/tune_triton.py --quick                                         # fewer variants

For each T bucket it times forward + backward (W frozen, the training step's cost) of K = N = 4096, E = 10,
r = 16 in bf16 for each variant of one op's heuristic config (the other ops at their heuristic), keeps each op's
fastest variant that beats the heuristic, and prints the ratio of every variant to the base F.linear measured in
the same run. Variants that fail to compile are skipped, with the reason.
Run with --device cpu under TRITON_INTERPRET=1 it only checks that every variant runs (tiny shapes, no timing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from personafuse_kernels.dispatch import token_bucket  # noqa: E402
from personafuse_kernels.functional import routed_lora  # noqa: E402
from personafuse_kernels.ops import launch_configs as lc  # noqa: E402
from personafuse_kernels.ops import routed_lora_triton as rlt  # noqa: E402

BUCKETS = (1, 16, 64, 4096, 16384)


def variants(t_bucket: int, quick: bool) -> list[tuple[str, dict]]:
    """(op, field overrides) to try on top of the heuristic; ("gemm", {}) is the heuristic itself."""
    if t_bucket <= lc.SMALL_T:
        grid = [("gemm", {}), ("gemm", {"block_n": 64}), ("gemm", {"block_n": 16, "block_k": 256}),
                ("shrink", {"split_k": 1}), ("shrink", {"split_k": 16}), ("gemm", {"num_warps": 8}),
                ("gemm", {"num_stages": 2}), ("dhg", {"block_n": 64})]
    else:
        grid = [("gemm", {}), ("gemm", {"tma": False}), ("gemm", {"tma": False, "block_n": 128}),
                ("gemm", {"warp_specialize": True}), ("gemm", {"block_n": 128}), ("gemm", {"num_stages": 4}),
                ("gemm", {"fuse_base": False}), ("gemm", {"block_m": 64, "block_n": 128}),
                ("shrink", {"num_warps": 4}), ("dhg", {"num_warps": 4}), ("wgrad_b", {"block_j": 64})]
    return grid[:3] if quick else grid


def time_ms(fn, device: str) -> float:
    if device != "cuda":
        fn()
        return float("nan")
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def tune_bucket(t_bucket: int, K: int, N: int, E: int, r: int, device: str, dtype, quick: bool, name: str):
    torch.manual_seed(0)
    T = t_bucket
    g = dict(device=device, dtype=dtype)
    x = torch.randn(T, K, **g, requires_grad=True)
    W, b = torch.randn(N, K, **g) / K**0.5, torch.randn(N, **g)
    A = (torch.randn(E, r, K, **g) / K**0.5).requires_grad_()
    B = (torch.randn(E, N, r, **g) / r**0.5).requires_grad_()
    gates = torch.softmax(torch.randn(T, E, device=device), -1).requires_grad_()
    dy = torch.randn(T, N, **g)

    def step():
        routed_lora(x, W, b, A, B, gates, scaling=2.0, backend="triton").backward(dy)

    def base_step():
        torch.nn.functional.linear(x, W, b).backward(dy)

    base_ms = time_ms(base_step, device)
    results = []
    for op, override in variants(t_bucket, quick):
        real = lc.get_config

        def patched(name, *args, _op=op, _override=override):  # the launcher asks get_config for each op
            cfg = real(name, *args)
            return dataclasses.replace(cfg, **_override) if name == _op else cfg

        rlt.get_config = patched
        try:
            ms = time_ms(step, device)
            results.append((ms, op, override))
            timing = f"{ms:8.4f} ms  {ms / base_ms:6.3f}x base" if ms == ms else "ran (interpreter: not timed)"
            print(f"  T<={t_bucket:<6} {op:<7} {json.dumps(override):<48} {timing}")
        except Exception as exc:  # a variant that does not compile here is skipped, not fatal
            print(f"  T<={t_bucket:<6} {op:<7} {json.dumps(override):<48} failed: {type(exc).__name__}: "
                  f"{(str(exc).splitlines() or [''])[0][:100]}")
        finally:
            rlt.get_config = real
    best = {}  # op -> (ms, override): the fastest variant of each op, kept only when it beats the heuristic
    heuristic_ms = next((ms for ms, op, o in results if not o), float("nan"))
    for ms, op, override in results:
        if ms == ms and override and ms < heuristic_ms and ms < best.get(op, (float("inf"),))[0]:
            best[op] = (ms, override)
    return {op: override for op, (_, override) in best.items()}, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for <GPU name>.json (default: print only)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--buckets", default=",".join(map(str, BUCKETS)))
    args = ap.parse_args(argv)
    buckets = [int(v) for v in args.buckets.split(",")]
    if args.device == "cpu":
        if not rlt.interpreting():
            ap.error("on CPU this needs TRITON_INTERPRET=1 (it then only checks that every variant runs)")
        shape, dtype, name = (48, 40, 3, 16), torch.float32, "interpreter"
        buckets = [min(b, 70) for b in buckets]
    else:
        shape, dtype, name = (4096, 4096, 10, 16), torch.bfloat16, torch.cuda.get_device_name()
    K, N, E, r = shape
    tables: dict = {}  # op -> {"T<=bucket": overrides}
    print(f"tuning the triton backend on {name}: K={K} N={N} E={E} r={r}, forward + backward")
    for t_bucket in buckets:
        best, _ = tune_bucket(t_bucket, K, N, E, r, args.device, dtype, args.quick, name)
        for op, override in best.items():
            tables.setdefault(op, {})[f"T<={token_bucket(t_bucket)}"] = override
    print(json.dumps(tables, indent=1))
    if args.out and args.device == "cuda":
        folder = Path(args.out) / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for op, table in tables.items():
            (folder / f"{op}.json").write_text(json.dumps(table, indent=1) + "\n")
            print(f"wrote {folder / f'{op}.json'}")
    return tables


if __name__ == "__main__":
    main()
