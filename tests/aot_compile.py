"""Compile the package's Triton kernels ahead of time, without a GPU, at the launch configs the launchers pick, and
read ptxas's resource report for each: registers, spills, shared memory, CTAs per SM, and any C75xx warning
(serialized wgmma among them).

    python tests/aot_compile.py [--arch 90a,80] [--matrix hot|all] [--jobs N]

Prints one JSON object per line, one per (case, arch). `--matrix hot` is every kernel that a default call of the op
launches on the production shapes (dense E = 10, r = 16; top-k E = 64, r = 16, k = 2); K = N = 4096) in both
config regimes (decode, T <= 64, and large T), with dropout on and off, bias on and off, bf16 (and fp16 for large
T); `all` adds the fallbacks (the pointer dual GEMM where the TMA one runs by default, A100 configs).

It runs in two environments: the package's own (torch and the Triton it installs) and a side environment that holds
only a Triton wheel (Triton 3.6.0, the one the GPU machine carries; tests/test_triton_aot.py). So it imports no
torch: it loads launch_configs.py and the kernel modules from the source tree without the package's __init__.
Each kernel is compiled with the signature, constants and alignment attributes that Triton's JIT would derive from
the launcher's real arguments at that shape (specialize() below). Run it where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "personafuse_kernels" not in sys.modules:  # a bare package object: its __init__ (which imports torch) never runs
    _pkg = types.ModuleType("personafuse_kernels")
    _pkg.__path__ = [str(ROOT / "personafuse_kernels")]
    sys.modules["personafuse_kernels"] = _pkg

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from personafuse_kernels.ops import launch_configs as lc  # noqa: E402
from personafuse_kernels.ops import triton_grouped_kernels as gk  # noqa: E402
from personafuse_kernels.ops import triton_kernels as tk  # noqa: E402
from personafuse_kernels.ops import triton_router_kernels as rk  # noqa: E402
from personafuse_kernels.ops import triton_routing_kernels as mk  # noqa: E402

# Per-SM limits for occupancy: registers, shared memory per SM and per block (bytes), threads, resident CTAs, and
# the shared memory the driver reserves per CTA. CUDA C Programming Guide, compute capability tables (8.0, 9.0).
CARDS = {
    "90a": {"name": "NVIDIA H200", "regs": 65536, "smem_sm": 233472, "smem_block": 232448, "threads": 2048,
            "ctas": 32, "reserved": 1024},
    "80": {"name": "NVIDIA A100-SXM4-80GB", "regs": 65536, "smem_sm": 167936, "smem_block": 166912,
           "threads": 2048, "ctas": 32, "reserved": 1024},
}
K = N = 4096
DENSE_E, TOPK_E, R, TOP_K = 10, 64, 16, 2
DECODE_T, LARGE_T = 16, 4096  # the T of each config regime's compile: T is a runtime argument the JIT specializes
DOT = {"DOT_PRECISION": "tf32", "UPCAST": False}
DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "i64": tl.int64, "i32": tl.int32}
P_DROP = 0.1


class _Pointer:
    """What the JIT sees of a tensor argument: its element type and a 16-byte aligned address (torch allocations
    are 256-byte aligned, and every tensor the launchers pass starts at its allocation)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def specialize(kernel, args: dict, constexprs: dict, dtype: str) -> tuple[dict, dict, dict]:
    """(signature, constants, attrs) exactly as Triton's JIT specializes a launch with these argument values: the
    runtime's own specialization rule (ints equal to 1 become constants, ints and pointers divisible by 16 get
    tt.divisibility), so the compile sees what a real launch compiles. Pointers are given as dtype names ("dt" is
    the case's dtype)."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
            continue
        if name not in args:
            raise KeyError(f"{kernel.fn.__name__}: no value for argument {name}")
        value = args[name]
        if isinstance(value, str):
            value = _Pointer(DTYPES[dtype if value == "dt" else value])
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            signature[name], constants[name] = "constexpr", key
        else:
            signature[name] = kind
            if key:
                attrs[(i,)] = CUDABackend.parse_attr(key)
    unknown = set(args) - set(kernel.arg_names)
    if unknown:
        raise KeyError(f"{kernel.fn.__name__}: unknown arguments {sorted(unknown)}")
    return signature, constants, attrs


def case(name, kernel, args: dict, constexprs: dict, options: dict, *, regime: str, path: str, dtype: str,
         hot: bool, sm90_only: bool = False) -> dict:
    """One compile of `kernel` with the launcher's runtime argument values `args` and its constexprs."""
    return {"name": name, "kernel": kernel.fn.__name__, "module": kernel.fn.__module__.rsplit(".", 1)[-1],
            "args": args, "constexprs": constexprs, "options": options, "regime": regime, "path": path,
            "dtype": dtype, "hot": hot, "sm90_only": sm90_only}


def dense_cases(T: int, dtype: str, card: str, hot: bool) -> list[dict]:
    """The dense-gate op (E = 10, r = 16, token gates): forward shrink + dual GEMM, backward dHg, the two
    weight-gradient GEMMs and dx, with each kernel's arguments as routed_lora_triton passes them."""
    E, r = DENSE_E, R
    C = E * r
    t_bucket = lc.token_bucket(T)
    sc, gc, dc, wa, wb = (lc.get_config(op, t_bucket, K, N, C, card)
                          for op in ("shrink", "gemm", "dhg", "wgrad_a", "wgrad_b"))
    small = t_bucket <= lc.SMALL_T
    kw = dict(regime="decode" if small else "large", path="dense", dtype=dtype)
    gates = {"GATES": "fp32", "SCALING": "fp32", "SEQ_ID": "fp32", "T": T, "R": r, "E": E, "SEQ_LEN": 1}
    out = []
    split = max(1, min(sc.split_k if small else 1, -(-K // sc.block_k)))  # as routed_lora_triton.shrink
    for p in (0.0, P_DROP):
        out.append(case(f"shrink dropout={p > 0}", tk._shrink_kernel,
                        {"X": "dt", "A": "dt", "SEED": "i64", "H": "dt", "HG": "dt",
                         "PARTIAL": "fp32" if split > 1 else "dt", "K": K, "C": C, **gates, "dropout_p": p,
                         "dropout_scale": 1 / (1 - p)},
                        {"HAS_DROPOUT": p > 0, "HAS_SEQ_ID": False, "SPLIT_K": split, "BLOCK_M": sc.block_m,
                         "BLOCK_C": sc.block_c,
                         "BLOCK_K": sc.block_k, **DOT}, {"num_warps": sc.num_warps}, hot=hot, **kw))
    if split > 1:
        out.append(case("shrink_finalize", tk._shrink_finalize_kernel,
                        {"PARTIAL": "fp32", "H": "dt", "HG": "dt", "C": C, **gates},
                        {"HAS_SEQ_ID": False, "SPLIT_K": split, "BLOCK_M": sc.block_m, "BLOCK_C": sc.block_c},
                        {"num_warps": sc.num_warps}, hot=hot, **kw))
    tiles = {"BLOCK_M": gc.block_m, "BLOCK_N": gc.block_n, "BLOCK_K": gc.block_k, "BLOCK_K2": gc.block_k2,
             "GROUP_M": gc.group_m, **DOT}
    ptrs = {"X1": "dt", "M1": "dt", "X2": "dt", "M2": "dt", "BIAS": "dt", "OUT": "dt", "SEED": "i64",
            "GATES": "fp32", "SEQ_ID": "fp32", "E": E, "SEQ_LEN": 1}
    idle = {"SKIP_IDLE": True, "HAS_SEQ_ID": False, "E_PAD": lc.pow2(E, 16)}  # row tiles without adapters skip
    no_idle = {**idle, "SKIP_IDLE": False}  # dx with dropout: the launcher does not check idle rows
    # y = x W^T + Hg B_cat^T (+ bias): bias on and off; dx = dY W + drop'(dH A_cat): dropout on and off
    y_sizes = {"M": T, "N": N, "K1": K, "K2": C}
    dx_sizes = {"M": T, "N": K, "K1": N, "K2": C}
    y_strides = {"R": r, "s_x1m": K, "s_x1k": 1, "s_m1k": 1, "s_m1n": K, "s_x2m": C, "s_x2k": 1, "s_m2e": N * r,
                 "s_m2j": 1, "s_m2n": r, "s_om": N, "s_on": 1}
    dx_strides = {"R": r, "s_x1m": N, "s_x1k": 1, "s_m1k": K, "s_m1n": 1, "s_x2m": C, "s_x2k": 1, "s_m2e": r * K,
                  "s_m2j": K, "s_m2n": 1, "s_om": K, "s_on": 1}
    for role, bias, p in (("y", True, 0.0), ("y", False, 0.0), ("dx", False, 0.0), ("dx", False, P_DROP)):
        sizes, strides = (y_sizes, y_strides) if role == "y" else (dx_sizes, dx_strides)
        flags = f"{role} bias={bias} dropout={p > 0}"
        drop = {"dropout_p": p, "dropout_scale": 1 / (1 - p)}
        if gc.tma:
            out.append(case(f"dual_gemm_tma {flags}", tk._dual_gemm_tma_kernel, {**ptrs, **sizes, **drop},
                            {"M_TRANS": role == "y", "HAS_BIAS": bias, "DROPOUT_TERM2": p > 0,
                             **(idle if p == 0 else no_idle), **tiles,
                             "NUM_SMS": 132, "NUM_STAGES": gc.num_stages, "WARP_SPECIALIZE": gc.warp_specialize},
                            {"num_warps": gc.num_warps}, hot=hot, sm90_only=True, **kw))
        out.append(case(f"dual_gemm {flags}", tk._dual_gemm_kernel, {**ptrs, **sizes, **strides, **drop},
                        {"HAS_TERM1": True, "HAS_BIAS": bias, "ACCUMULATE": False, "DROPOUT_TERM2": p > 0,
                         **(idle if p == 0 else no_idle), **tiles, "BLOCK_N": gc.pointer_block_n},
                        {"num_warps": gc.num_warps, "num_stages": gc.num_stages}, hot=hot and not gc.tma, **kw))
    r_pad = lc.pow2(r)
    experts_per_block = max(min(lc.pow2(E), max(1, 64 // r_pad)), -(-16 // r_pad))  # as routed_lora_triton.dhg
    out.append(case("dhg", tk._dhg_kernel,
                    {"DY": "dt", "B": "dt", "H": "dt", "DH": "dt", "DG": "fp32", "N": N, **gates, "s_be": N * r,
                     "s_bn": r, "s_bj": 1},
                    {"HAS_SEQ_ID": False, "BLOCK_M": dc.block_m, "BLOCK_N": dc.block_n,
                     "EXPERTS_PER_BLOCK": experts_per_block,
                     "R_PAD": r_pad, **DOT}, {"num_warps": dc.num_warps}, hot=hot, **kw))
    split_t = 1 if small else 2  # routed_lora_triton._split_t on 132 SMs: about two waves of tiles
    for role, q_mode, (I, J), p, wc in (("dB", tk.Q_GATED, (N, C), 0.0, wb), ("dA", tk.Q_PLAIN, (C, K), 0.0, wa),
                                        ("dA dropout", tk.Q_DROPOUT, (C, K), P_DROP, wa)):
        out.append(case(f"tn_gemm {role}", tk._tn_gemm_kernel,
                        {"P": "dt", "Q": "dt", "SEED": "i64", "OUT": "fp32", **gates, "I": I, "J": J, "s_pt": I,
                         "s_pi": 1, "s_qt": J, "s_qj": 1, "s_os": I * J if split_t > 1 else 0, "s_oi": J, "s_oj": 1,
                         "dropout_p": p, "dropout_scale": 1 / (1 - p)},
                        {"Q_MODE": q_mode.value, "HAS_SEQ_ID": False, "ATOMIC": False, "SPLIT_T": split_t,
                         "BLOCK_I": wc.block_i,
                         "BLOCK_J": wc.block_j, "BLOCK_T": wc.block_t, **DOT}, {"num_warps": wc.num_warps},
                        hot=hot, **kw))
    return out


def topk_cases(T: int, dtype: str, card: str, hot: bool) -> list[dict]:
    """The grouped top-k op (E = 64, r = 16, k = 2: grouped by the dispatch rule) and the fused router, with each
    kernel's arguments as routed_lora_topk_triton and router_triton pass them."""
    E, r, k = TOPK_E, R, TOP_K
    t_bucket = lc.token_bucket(T)
    block_m = 16 if T * k <= 1024 else 64  # dispatch.topk_block_m("triton", T, k)
    pc, ec, wc, rc = (lc.get_config(op, t_bucket, K, N, r, card) for op in ("pair", "expand", "expert_wgrad",
                                                                              "router"))
    kw = dict(regime="decode" if t_bucket <= lc.SMALL_T else "large", path="topk", dtype=dtype, hot=hot)
    meta = {"BLOCK_GROUP": "i32", "BLOCK_START": "i32", "GROUP_START": "i32", "SORTED_PAIRS": "i32", "K_SLOTS": k}
    r_pad = lc.pow2(r, 16)
    out = []
    pair = {"X": "dt", "M": "dt", "W_PAIR": "fp32", "SCALING": "fp32", "SEED": "i64", "H": "dt", "OUT": "dt",
            "DW": "fp32", "R": r, **meta}
    for name, epilogue, p, geometry in (
            ("shrink", gk.EPI_SHRINK, 0.0, {"L": K, "s_me": r * K, "s_ml": 1, "s_mj": K}),
            ("shrink", gk.EPI_SHRINK, P_DROP, {"L": K, "s_me": r * K, "s_ml": 1, "s_mj": K}),
            ("dhg", gk.EPI_DHG, 0.0, {"L": N, "s_me": N * r, "s_ml": r, "s_mj": 1})):
        out.append(case(f"grouped_pair_gemm {name} dropout={p > 0}", gk._grouped_pair_gemm_kernel,
                        {**pair, **geometry, "dropout_p": p, "dropout_scale": 1 / (1 - p)},
                        {"EPILOGUE": epilogue.value, "HAS_DROPOUT": p > 0, "BLOCK_M": block_m,
                         "BLOCK_L": pc.block_l, "R_PAD": r_pad, **DOT}, {"num_warps": pc.num_warps}, **kw))
    for role, p, geometry in (("y", 0.0, {"N": N, "s_me": N * r, "s_mj": 1, "s_mn": r}),
                              ("dx", 0.0, {"N": K, "s_me": r * K, "s_mj": K, "s_mn": 1}),
                              ("dx", P_DROP, {"N": K, "s_me": r * K, "s_mj": K, "s_mn": 1})):
        for slot in range(k):  # the JIT compiles slot 1 apart (an int equal to 1 becomes a constant)
            out.append(case(f"grouped_expand {role} dropout={p > 0} slot={slot}", gk._grouped_expand_kernel,
                            {"X2": "dt", "M": "dt", "OUT": "dt", "SEED": "i64", **meta, **geometry, "R": r,
                             "SLOT": slot, "dropout_p": p, "dropout_scale": 1 / (1 - p)},
                            {"HAS_DROPOUT": p > 0, "BLOCK_M": block_m, "BLOCK_N": ec.block_n, "R_PAD": r_pad,
                             **DOT}, {"num_warps": ec.num_warps}, **kw))
    for role, mode, p, (I, J) in (("dB", gk.WGRAD_B, 0.0, (N, r)), ("dA", gk.WGRAD_A, 0.0, (r, K)),
                                  ("dA", gk.WGRAD_A, P_DROP, (r, K))):
        out.append(case(f"grouped_wgrad {role} dropout={p > 0}", gk._grouped_wgrad_kernel,
                        {"P": "dt", "Q": "dt", "W_PAIR": "fp32", "SCALING": "fp32", "SEED": "i64", "OUT": "fp32",
                         "GROUP_START": "i32", "SORTED_PAIRS": "i32", "I": I, "J": J, "R": r, "K_SLOTS": k,
                         "s_os": E * I * J, "s_oe": I * J, "s_oi": J, "s_oj": 1, "dropout_p": p,
                         "dropout_scale": 1 / (1 - p)},
                        {"MODE": mode.value, "HAS_DROPOUT": p > 0, "SPLIT": 1,  # 2 * 132 SMs < E * tiles
                         "BLOCK_I": lc.pow2(I, 16, wc.max_block), "BLOCK_J": lc.pow2(J, 16, wc.max_block),
                         "BLOCK_T": wc.block_t, **DOT}, {"num_warps": wc.num_warps}, **kw))
    # the routing metadata (ops/routing_triton.py: CHUNK 128, JB 32)
    P, G = T * k, E * k
    nchunk = -(-P // 128)
    out.append(case("route_count", mk._route_count_kernel, {"IDX": "i64", "CNT": "i32", "P": P, "K_SLOTS": k, "G": G},
                    {"CHUNK": 128}, {"num_warps": 4}, **{**kw, "path": "topk"}))
    out.append(case("route_scan", mk._route_scan_kernel,
                    {"CNT": "i32", "OFF": "i32", "GROUP_START": "i32", "BLOCK_GROUP": "i32", "BLOCK_START": "i32",
                     "NCHUNK": nchunk, "G": G, "MAXB": -(-P // block_m) + G},
                    {"BLOCK_M": block_m, "G_PAD": lc.pow2(G + 1), "JB": 32}, {"num_warps": 8}, **kw))
    out.append(case("route_scatter", mk._route_scatter_kernel,
                    {"IDX": "i64", "OFF": "i32", "GROUP_START": "i32", "SORTED": "i32", "P": P, "K_SLOTS": k, "G": G},
                    {"CHUNK": 128}, {"num_warps": 4}, **kw))
    block_e = lc.pow2(E, 16)
    out.append(case("topk_router_fwd", rk._topk_router_fwd_kernel,
                    {"X": "dt", "W": "dt", "B": "dt", "PROBS": "fp32", "LSE": "fp32", "IDX": "i64", "WTS": "fp32",
                     "T": T, "K": K, "E": E, "inv_temp": 1.0},
                    {"TOP_K": k, "BLOCK_M": rc.block_m, "BLOCK_E": block_e, "BLOCK_K": rc.block_k, **DOT},
                    {"num_warps": rc.num_warps}, **{**kw, "path": "router"}))
    out.append(case("topk_router_bwd", rk._topk_router_bwd_kernel,
                    {"PROBS": "fp32", "IDX": "i64", "WTS": "fp32", "DWTS": "fp32", "DPROBS": "fp32", "DLSE": "fp32",
                     "DLOGITS": "fp32", "T": T, "E": E, "inv_temp": 1.0},
                    {"TOP_K": k, "HAS_DPROBS": True, "HAS_DLSE": True, "BLOCK_M": rc.block_m, "BLOCK_E": block_e},
                    {"num_warps": rc.num_warps}, **{**kw, "path": "router"}))
    return out


def matrix(which: str, arch: str) -> list[dict]:
    card = CARDS[arch]["name"]
    cases = []
    for T, dtypes in ((DECODE_T, ("bf16",)), (LARGE_T, ("bf16", "fp16"))):
        for dtype in dtypes:
            cases += dense_cases(T, dtype, card, hot=True)
            cases += topk_cases(T, dtype, card, hot=True)
    if arch != "90a":  # another card's configs: reported, never hot (the gate is Hopper's)
        for c in cases:
            c["hot"] = False
    cases = [c for c in cases if not (c["sm90_only"] and not arch.startswith("90"))]
    if which == "hot":
        cases = [c for c in cases if c["hot"]]
    return cases


def ptxas_path() -> str:
    env = os.environ.get("TRITON_PTXAS_PATH")
    return env or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def parse_ptxas(text: str) -> dict:
    """Registers, spills, stack, static shared memory and warnings from `ptxas -v` output (one entry function)."""
    def num(pattern, default=0):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else default

    warnings = sorted({m.group(0) for m in re.finditer(r"\(C\d{4}\)[^\n]*", text)})
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "static_smem": num(r"(\d+) bytes smem"), "warnings": warnings}


def occupancy(arch: str, registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM, the smallest of the register, shared-memory, thread and CTA limits."""
    card = CARDS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = card["regs"] // (regs_per_warp * num_warps)
    by_smem = card["smem_sm"] // (shared + card["reserved"]) if shared else card["ctas"]
    by_threads = card["threads"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, card["ctas"]))


def serialized_wgmma(warnings: list[str]) -> bool:
    return any("wgmma" in w.lower() or "serializ" in w.lower() for w in warnings)


def compile_case(item: tuple[dict, str]) -> dict:
    c, arch = item
    modules = {"triton_kernels": tk, "triton_grouped_kernels": gk, "triton_router_kernels": rk,
               "triton_routing_kernels": mk}
    kernel = getattr(modules[c["module"]], c["kernel"])
    cap = int(arch.rstrip("a"))
    row = {"case": c["name"], "kernel": c["kernel"], "arch": f"sm_{arch}", "regime": c["regime"], "path": c["path"],
           "dtype": c["dtype"], "hot": c["hot"], "triton": triton.__version__,
           "config": {k: v for k, v in c["constexprs"].items() if k not in DOT}, **c["options"]}
    t0 = time.time()
    try:
        signature, constants, attrs = specialize(kernel, c["args"], c["constexprs"], c["dtype"])
        src = ASTSource(kernel, signature, constants, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=c["options"])
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            ptx_file = Path(tmp) / "k.ptx"
            ptx_file.write_text(ptx)
            gpu = f"sm_{arch}" if arch.endswith("a") or cap < 90 else f"sm_{arch}a"
            res = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", str(ptx_file), "-o",
                                  str(Path(tmp) / "k.cubin")], capture_output=True, text=True, timeout=600)
        report = parse_ptxas(res.stdout + res.stderr)
        shared = int(compiled.metadata.shared) + report["static_smem"]
        num_warps = c["options"].get("num_warps", 4)
        row.update(ok=res.returncode == 0, shared=shared, smem_limit=CARDS[arch]["smem_block"],
                   wgmma="wgmma.mma_async" in ptx, **report,
                   ctas_per_sm=occupancy(arch, report["registers"], shared, num_warps),
                   serialized_wgmma=serialized_wgmma(report["warnings"]))
        if res.returncode != 0:
            row["error"] = (res.stderr or res.stdout)[-400:]
    except Exception as exc:  # reported, not raised: the test decides
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="90a", help="comma-separated: 90a, 80")
    ap.add_argument("--matrix", choices=("hot", "all"), default="hot")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="print the cases without compiling")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("run without TRITON_INTERPRET=1 (the interpreter replaces the compiler)")
    items = [(c, arch) for arch in args.arch.split(",") for c in matrix(args.matrix, arch)]
    if args.list:
        for c, arch in items:
            print(json.dumps({"case": c["name"], "arch": arch, "regime": c["regime"], "dtype": c["dtype"],
                              "hot": c["hot"]}))
        return 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(compile_case, items):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
