"""Benchmark the routed LoRA layer against what users would otherwise run, as ratios to the base linear.

Providers (each computes y = x W^T + b + sum_e s_e g[t, e] (x A_e^T) B_e^T):
    base      F.linear alone (cuBLAS): the denominator of every ratio, measured in the same run
    loop      per-expert loop through autograd (how peft's X-LoRA and most MoLoRA code compute it)
    stacked   two stacked GEMMs plus an elementwise gate, autograd through ops (a careful hand-written torch)
    compile   torch.compile of stacked
    torch / triton / cuda   personafuse_kernels backends (pfk.routed_lora with backend=...)
Modes: fwd, fwdbwd (W frozen: gradients of x, lora_A, lora_B and gates; the base needs dx only).
Metrics: median ms (GPU: triton.testing.do_bench, L2 flushed before every repetition), ratio to base,
TFLOP/s from the cost model of DESIGN.md, peak MiB allocated above the inputs.

    python benchmarks/bench_routed_lora.py --out results/            # GPU: the issue's shape table
    python benchmarks/bench_routed_lora.py --quick                     # small CPU shapes, a smoke test
Rows are saved as CSV and JSON with the GPU name, versions, git commit and time; a short table is printed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import personafuse_kernels as pfk  # noqa: E402

GPU_SHAPES = [  # T, K, N, E, r
    (1, 4096, 4096, 10, 16),
    (16, 4096, 4096, 10, 16),
    (64, 4096, 4096, 10, 16),
    (4096, 4096, 4096, 10, 16),
    (16384, 4096, 4096, 10, 16),
    (8192, 4096, 14336, 10, 16),
    (8192, 14336, 4096, 10, 16),
]
QUICK_SHAPES = [(1, 256, 256, 10, 16), (256, 256, 512, 10, 16)]
PROVIDERS = ["base", "loop", "stacked", "compile", "torch", "triton", "cuda"]


def loop_lora(x, W, b, A, B, g, s):
    y = F.linear(x, W, b)
    for e in range(A.shape[0]):
        y = y + (s[e] * g[:, e : e + 1]).to(x.dtype) * ((x @ A[e].t()) @ B[e].t())
    return y


def stacked_lora(x, W, b, A, B, g, s):
    T, K = x.shape
    E, r, _ = A.shape
    H = x @ A.reshape(E * r, K).t()
    Hg = (H.view(T, E, r) * (g * s).to(x.dtype)[:, :, None]).view(T, E * r)
    return torch.addmm(F.linear(x, W, b), Hg, B.permute(1, 0, 2).reshape(-1, E * r).t())


def make_provider(name: str):
    if name == "base":
        return lambda x, W, b, A, B, g, s: F.linear(x, W, b)
    if name == "loop":
        return loop_lora
    if name == "stacked":
        return stacked_lora
    if name == "compile":
        return torch.compile(stacked_lora)
    return lambda x, W, b, A, B, g, s: pfk.routed_lora(x, W, b, A, B, g, scaling=s, backend=name)


def flops(mode: str, T: int, K: int, N: int, E: int, r: int, provider: str) -> float:
    if provider == "base":
        return (2 if mode == "fwd" else 4) * T * K * N
    return (2 * T * K * N + 2 * T * E * r * (K + N)) if mode == "fwd" else (4 * T * K * N + 6 * T * E * r * (K + N))


def median_ms(fn, device: str, grad_to_none=None) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def env_facts() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "commit": commit, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_case(shape, mode, providers, device, dtype, progress):
    T, K, N, E, r = shape
    g = dict(device=device, dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(T, K, **g)
    W = torch.randn(N, K, **g) / K**0.5
    b = torch.randn(N, **g)
    A = torch.randn(E, r, K, **g) / K**0.5
    B = torch.randn(E, N, r, **g) / r**0.5
    gates = torch.softmax(torch.randn(T, E, device=device), -1)
    s = torch.full((E,), 2.0, device=device)
    leaves = [x, A, B, gates] if mode == "fwdbwd" else []
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn(T, N, **g)
    rows, base_ms = [], None
    for name in providers:
        progress.set_postfix_str(f"{name} {mode} T={T} K={K} N={N}")
        row = {"provider": name, "mode": mode, "T": T, "K": K, "N": N, "E": E, "r": r, "dtype": str(dtype)[6:]}
        try:
            fn_fwd = make_provider(name)
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return fn_fwd(x, W, b, A, B, gates, s)
            else:
                def fn():
                    fn_fwd(x, W, b, A, B, gates, s).backward(dy)
            fn()  # compile / first launch outside the timing and the memory peak
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            ms = median_ms(fn, device, grad_to_none=leaves)
            if device == "cuda":
                row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
            row["ms"] = round(ms, 5)
            row["tflops"] = round(flops(mode, T, K, N, E, r, name) / ms / 1e9, 2)
            if name == "base":
                base_ms = ms
            row["ratio_to_base"] = round(ms / base_ms, 3) if base_ms else None
        except Exception as exc:  # a provider that cannot run here (no GPU, no extension) is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        for t in leaves:
            t.grad = None
        rows.append(row)
        progress.update(1)
    return rows


def print_table(rows, file=sys.stdout):
    print(f"{'shape T,K,N,E,r':<28}{'mode':<8}" + "".join(f"{p:>10}" for p in PROVIDERS), file=file)
    keys = sorted({(r["T"], r["K"], r["N"], r["E"], r["r"], r["mode"]) for r in rows},
                  key=lambda k: (k[5], k[0], k[1], k[2]))
    for T, K, N, E, rr, mode in keys:
        cells = []
        for p in PROVIDERS:
            match = [r for r in rows if (r["T"], r["K"], r["N"], r["E"], r["r"], r["mode"], r["provider"])
                     == (T, K, N, E, rr, mode, p)]
            if not match:
                cells.append("")
            elif "error" in match[0]:
                cells.append("n/a")
            elif p == "base":
                cells.append(f"{match[0]['ms']:.3f}ms")
            else:
                cells.append(f"{match[0]['ratio_to_base']:.2f}x")
        print(f"{f'{T},{K},{N},{E},{rr}':<28}{mode:<8}" + "".join(f"{c:>10}" for c in cells), file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description="routed LoRA benchmark: ratios to F.linear measured in the same run")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--shapes", default=None, help="semicolon-separated T,K,N,E,r tuples")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="folder for rows.csv and rows.json")
    args = ap.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if unknown := [p for p in providers if p not in PROVIDERS]:
        ap.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    if providers[0] != "base":
        providers = ["base"] + [p for p in providers if p != "base"]
    modes = [m.strip() for m in args.modes.split(",")]
    if bad := [m for m in modes if m not in ("fwd", "fwdbwd")]:
        ap.error(f"unknown modes {bad}; choose from fwd, fwdbwd")
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
            assert all(len(s) == 5 for s in shapes)
        except (ValueError, AssertionError):
            ap.error(f"--shapes must be T,K,N,E,r tuples separated by ';', got {args.shapes!r}")
    else:
        shapes = QUICK_SHAPES if args.quick or args.device == "cpu" else GPU_SHAPES
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible")
    dtype = getattr(torch, args.dtype) if args.device == "cuda" else torch.float32
    facts = env_facts()
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(shapes) * len(modes) * len(providers), desc="bench", file=sys.stderr) as progress:
        for shape in shapes:
            for mode in modes:
                rows += [{**r, **facts} for r in bench_case(shape, mode, providers, args.device, dtype, progress)]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
        fields = sorted({k for r in rows for k in r})
        with open(out / "rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    print(f"\n{facts['device']} | torch {facts['torch']} | triton {facts['triton']} | commit {facts['commit']} | "
          f"{args.dtype if args.device == 'cuda' else 'float32'}; base in ms, others as ratio to base (same run)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
