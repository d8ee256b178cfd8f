"""Compile every Triton kernel of the package for real GPUs (sm_80 and sm_90) without a GPU, with the configs
the launchers use, and report shared memory and whether Hopper's wgmma was emitted. Run it in a process where
TRITON_INTERPRET is unset (tests/test_triton_aot.py does); prints one JSON object per line.

This catches what the interpreter cannot: tl.dot shape rules, shared-memory overflow of a pipelined config,
code generation failures of the TMA / warp-specialized paths.
"""
import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from personafuse_kernels.ops import router_triton  # noqa: E402
from personafuse_kernels.ops import triton_grouped_kernels as gk
from personafuse_kernels.ops import triton_kernels as tk
from personafuse_kernels.ops.launch_configs import get_config  # noqa: E402

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100/H200)


def sig(kernel, types: dict, constexprs: dict):
    """Signature for ASTSource: every argument typed, constexprs marked."""
    out = {}
    for name in kernel.arg_names:
        out[name] = "constexpr" if name in constexprs else types[name]
    return out


def gemm_cases(dtype="bf16"):
    p = f"*{dtype}"
    cases = []
    for t_bucket, device in ((1, "NVIDIA H200"), (4096, "NVIDIA H200"), (4096, "NVIDIA A100-SXM4-80GB")):
        sc, gc, dc, wc = (get_config(op, t_bucket, 4096, 4096, 160, device)
                          for op in ("shrink", "gemm", "dhg", "wgrad"))
        dot = {"DOT_PRECISION": "tf32", "UPCAST": False}
        opts = {"num_warps": gc.num_warps, "num_stages": gc.num_stages}
        tag = f"T<={t_bucket} {device}"
        split = sc.split_k if t_bucket <= 64 else 1
        cases.append((f"shrink {tag}", tk._shrink_kernel,
                       {"X": p, "A": p, "GATES": "*fp32", "SCALING": "*fp32", "SEED": "*i64", "H": p, "HG": p,
                        "PARTIAL": "*fp32", "T": "i32", "K": "i32", "C": "i32", "R": "i32", "E": "i32",
                        "SEQ_LEN": "i32", "dropout_p": "fp32", "dropout_scale": "fp32"},
                       {"HAS_DROPOUT": True, "SPLIT_K": split, "BLOCK_M": sc.block_m, "BLOCK_C": sc.block_c,
                        "BLOCK_K": sc.block_k, **dot}, {"num_warps": sc.num_warps}))
        cases.append((f"shrink_finalize {tag}", tk._shrink_finalize_kernel,
                       {"PARTIAL": "*fp32", "GATES": "*fp32", "SCALING": "*fp32", "H": p, "HG": p, "T": "i32",
                        "C": "i32", "R": "i32", "E": "i32", "SEQ_LEN": "i32"},
                       {"SPLIT_K": max(split, 2), "BLOCK_M": sc.block_m, "BLOCK_C": sc.block_c},
                       {"num_warps": sc.num_warps}))
        dual_types = {"X1": p, "M1": p, "X2": p, "M2": p, "BIAS": p, "OUT": p, "SEED": "*i64", "M": "i32",
                      "N": "i32", "K1": "i32", "K2": "i32", "R": "i32", "s_x1m": "i32", "s_x1k": "i32",
                      "s_m1k": "i32", "s_m1n": "i32", "s_x2m": "i32", "s_x2k": "i32", "s_m2e": "i32",
                      "s_m2j": "i32", "s_m2n": "i32", "s_om": "i32", "s_on": "i32", "dropout_p": "fp32",
                      "dropout_scale": "fp32"}
        for dropout in (False, True):
            cases.append((f"dual_gemm dropout={dropout} {tag}", tk._dual_gemm_kernel, dual_types,
                          {"HAS_TERM1": True, "HAS_BIAS": True, "ACCUMULATE": False, "DROPOUT_TERM2": dropout,
                           "BLOCK_M": gc.block_m, "BLOCK_N": gc.block_n, "BLOCK_K": gc.block_k,
                           "BLOCK_K2": gc.block_k2, "GROUP_M": gc.group_m, **dot}, opts))
        if gc.tma:
            for m_trans, ws in ((True, False), (False, False), (True, True)):
                cases.append((f"dual_gemm_tma m_trans={m_trans} ws={ws} {tag}", tk._dual_gemm_tma_kernel,
                              {"X1": p, "M1": p, "X2": p, "M2": p, "BIAS": p, "OUT": p, "SEED": "*i64", "M": "i32",
                               "N": "i32", "K1": "i32", "K2": "i32", "dropout_p": "fp32", "dropout_scale": "fp32"},
                              {"M_TRANS": m_trans, "HAS_BIAS": m_trans, "DROPOUT_TERM2": not m_trans,
                               "BLOCK_M": gc.block_m, "BLOCK_N": gc.block_n, "BLOCK_K": gc.block_k,
                               "BLOCK_K2": gc.block_k2, "GROUP_M": gc.group_m, "NUM_SMS": 132,
                               "NUM_STAGES": gc.num_stages, "WARP_SPECIALIZE": ws, **dot},
                              {"num_warps": gc.num_warps}))
        cases.append((f"dhg {tag}", tk._dhg_kernel,
                      {"DY": p, "B": p, "H": p, "GATES": "*fp32", "SCALING": "*fp32", "DH": p, "DG": "*fp32",
                       "T": "i32", "N": "i32", "R": "i32", "E": "i32", "SEQ_LEN": "i32", "s_be": "i32",
                       "s_bn": "i32", "s_bj": "i32"},
                      {"BLOCK_M": dc.block_m, "BLOCK_N": dc.block_n, "EXPERTS_PER_BLOCK": 4, "R_PAD": 16, **dot},
                      {"num_warps": dc.num_warps}))
        for q_name in ("Q_DROPOUT", "Q_GATED"):  # wgrad_A with dropout, wgrad_B
            q_mode = getattr(tk, q_name).value
            cases.append((f"tn_gemm {q_name} {tag}", tk._tn_gemm_kernel,
                          {"P": p, "Q": p, "GATES": "*fp32", "SCALING": "*fp32", "SEED": "*i64", "OUT": "*fp32",
                           "T": "i32", "I": "i32", "J": "i32", "R": "i32", "E": "i32", "SEQ_LEN": "i32",
                           "s_pt": "i32", "s_pi": "i32", "s_qt": "i32", "s_qj": "i32", "s_os": "i32",
                           "s_oi": "i32", "s_oj": "i32", "dropout_p": "fp32", "dropout_scale": "fp32"},
                          {"Q_MODE": q_mode, "ATOMIC": False, "SPLIT_T": 4, "BLOCK_I": wc.block_i,
                           "BLOCK_J": wc.block_j, "BLOCK_T": wc.block_t, **dot}, {"num_warps": wc.num_warps}))
    dot = {"DOT_PRECISION": "tf32", "UPCAST": False}
    meta_types = {"BLOCK_GROUP": "*i32", "BLOCK_START": "*i32", "GROUP_START": "*i32", "SORTED_PAIRS": "*i32"}
    for epi_name in ("EPI_SHRINK", "EPI_DHG"):
        epilogue = getattr(gk, epi_name).value
        cases.append((f"grouped_pair_gemm {epi_name}", gk._grouped_pair_gemm_kernel,
                      {"X": p, "M": p, "W_PAIR": "*fp32", "SCALING": "*fp32", "SEED": "*i64", "H": p, "OUT": p,
                       "DW": "*fp32", **meta_types, "L": "i32", "R": "i32", "K_SLOTS": "i32", "s_me": "i32",
                       "s_ml": "i32", "s_mj": "i32", "dropout_p": "fp32", "dropout_scale": "fp32"},
                      {"EPILOGUE": epilogue, "HAS_DROPOUT": epi_name == "EPI_SHRINK", "BLOCK_M": 64, "BLOCK_L": 64,
                       "R_PAD": 16, **dot}, {"num_warps": 4}))
    cases.append(("grouped_expand", gk._grouped_expand_kernel,
                  {"X2": p, "M": p, "OUT": p, "SEED": "*i64", **meta_types, "N": "i32", "R": "i32",
                   "K_SLOTS": "i32", "SLOT": "i32", "s_me": "i32", "s_mj": "i32", "s_mn": "i32",
                   "dropout_p": "fp32", "dropout_scale": "fp32"},
                  {"HAS_DROPOUT": True, "BLOCK_M": 64, "BLOCK_N": 64, "R_PAD": 16, **dot}, {"num_warps": 4}))
    for mode_name in ("WGRAD_B", "WGRAD_A"):
        mode = getattr(gk, mode_name).value
        cases.append((f"grouped_wgrad {mode_name}", gk._grouped_wgrad_kernel,
                      {"P": p, "Q": p, "W_PAIR": "*fp32", "SCALING": "*fp32", "SEED": "*i64", "OUT": "*fp32",
                       "GROUP_START": "*i32", "SORTED_PAIRS": "*i32", "I": "i32", "J": "i32", "R": "i32",
                       "K_SLOTS": "i32", "s_os": "i32", "s_oe": "i32", "s_oi": "i32", "s_oj": "i32",
                       "dropout_p": "fp32", "dropout_scale": "fp32"},
                      {"MODE": mode, "HAS_DROPOUT": mode_name == "WGRAD_A", "SPLIT": 4,
                       "BLOCK_I": 64 if mode_name == "WGRAD_B" else 16, "BLOCK_J": 16 if mode_name == "WGRAD_B" else 64,
                       "BLOCK_T": 32, **dot}, {"num_warps": 4}))
    cases.append(("topk_router", router_triton._topk_router_fwd_kernel,
                  {"X": p, "W": p, "B": p, "PROBS": "*fp32", "LSE": "*fp32", "IDX": "*i64", "WTS": "*fp32",
                   "T": "i32", "K": "i32", "E": "i32", "inv_temp": "fp32"},
                  {"TOP_K": 2, "BLOCK_M": 32, "BLOCK_E": 128, "BLOCK_K": 64, **dot}, {"num_warps": 4}))
    cases.append(("topk_router_bwd", router_triton._topk_router_bwd_kernel,
                  {"PROBS": "*fp32", "IDX": "*i64", "WTS": "*fp32", "DWTS": "*fp32", "DPROBS": "*fp32",
                   "DLSE": "*fp32", "DLOGITS": "*fp32", "T": "i32", "E": "i32", "inv_temp": "fp32"},
                  {"TOP_K": 2, "HAS_DPROBS": True, "HAS_DLSE": True, "BLOCK_M": 32, "BLOCK_E": 128},
                  {"num_warps": 4}))
    return cases


def main():
    archs = [int(a) for a in (sys.argv[1:] or ["90", "80"])]
    for name, kernel, types, constexprs, options in gemm_cases():
        for arch in archs:
            if "tma" in name and arch < 90:
                continue
            t0 = time.time()
            row = {"kernel": name, "arch": arch}
            try:
                src = ASTSource(kernel, sig(kernel, types, constexprs), constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                row.update(ok=True, shared=compiled.metadata.shared, smem_limit=SMEM_LIMIT[arch],
                           wgmma="wgmma.mma_async" in compiled.asm["ptx"], seconds=round(time.time() - t0, 2))
            except Exception as exc:  # reported, not raised: the test decides
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
