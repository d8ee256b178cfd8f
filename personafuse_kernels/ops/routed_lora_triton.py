"""The ``triton`` backend: launchers for the kernels in triton_kernels.py, same math and signatures as
routed_lora_torch.py (its reference; tests hold every kernel to it, forward and every gradient).

forward  (3 launches, or 4 for small T):
    shrink        H = drop(x) A_cat^T with Hg = H * s_e g in the epilogue      [T, C]
                  small T: split-K over K (fp32 partials) + a finalize kernel that sums and gates
    dual GEMM     y = x W^T + b + Hg B_cat^T in one K-loop over K + C (fused), or, by config,
                  cuBLAS F.linear then Hg B_cat^T accumulated into y in place
backward:
    dHg kernel    dHg = dY B_cat; epilogue dg (row-block reduction against H) and dH = dHg * s_e g
    tn GEMMs      dB = dY^T Hg (Hg rebuilt from H on load), dA = dH^T drop(x) (mask rebuilt from the seed)
                  split over T with fp32 partials summed in a fixed order (deterministic); atomics only
                  with PERSONAFUSE_ATOMIC_REDUCE=1
    dual GEMM     dx = dY W + drop'(dH A_cat), both terms in one accumulator pass
    cuBLAS        dW = dY^T x, db = sum_t dY, only when the base is trainable

No host synchronization anywhere (the dropout seed is read on the device), so CUDA graphs can capture it.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..dispatch import interpreting
from ..routing.gates import row_sums
from . import routed_lora_torch
from . import triton_kernels as tk
from .launch_configs import SMALL_T, DhgConfig, GemmConfig, ShrinkConfig, WgradConfig, get_config
from .triton_utils import cdiv, check_dot_tiles, config_key, dot_args, num_sms, pow2


class Configs(NamedTuple):
    """The launch config of each op one call runs (ops/launch_configs.py)."""
    shrink: ShrinkConfig
    gemm: GemmConfig
    dhg: DhgConfig
    wgrad_a: WgradConfig
    wgrad_b: WgradConfig


def _configs_for(x: torch.Tensor, K: int, N: int, C: int) -> Configs:
    key = config_key(x, K, N, C)
    return Configs(*(get_config(op, *key) for op in Configs._fields))


def _split_t(T: int, tiles: int, block_t: int, device: torch.device) -> int:
    """Chunks of T for the weight-gradient reductions: enough programs for about two waves of SMs."""
    if interpreting():
        return min(2, cdiv(T, block_t))
    want = max(1, (2 * num_sms(device)) // max(tiles, 1))
    return max(1, min(want, cdiv(T, 4 * block_t)))


def _atomic_reduce() -> bool:
    return os.environ.get("PERSONAFUSE_ATOMIC_REDUCE", "0") == "1" and not torch.are_deterministic_algorithms_enabled()


def _rows(seq_len, stand_in) -> tuple:
    """(SEQ_ID, SEQ_LEN, HAS_SEQ_ID) kernel arguments for seq_len, tokens per gate row or the row map [T] int32 of
    packed sequences (triton_kernels._gate_rows)."""
    if isinstance(seq_len, torch.Tensor):
        return seq_len, 1, True
    return stand_in, seq_len, False


def shrink(x, lora_A, gates, scaling, seed, seq_len, dropout_p: float, cfg: ShrinkConfig):
    """(H, Hg) [T, C] in x's dtype. x [T, K], lora_A [E, r, K], gates [G, E] fp32, scaling [E] fp32."""
    T, K = x.shape
    E, r, _ = lora_A.shape
    C = E * r
    H = x.new_empty(T, C)
    Hg = x.new_empty(T, C)
    if T == 0:
        return H, Hg
    split = cfg.split_k if T <= SMALL_T else 1
    split = max(1, min(split, cdiv(K, cfg.block_k)))
    partial = x.new_empty((split, T, C), dtype=torch.float32) if split > 1 else H
    scale = 1.0 / (1.0 - dropout_p)
    grid = (cdiv(C, cfg.block_c), cdiv(T, cfg.block_m), split)  # C tiles of a row block adjacent
    check_dot_tiles(cfg.block_m, cfg.block_c, cfg.block_k)
    seq_id, rows_per, has_seq_id = _rows(seq_len, gates)
    tk._shrink_kernel[grid](
        x, lora_A, gates, scaling, seed, H, Hg, partial, seq_id, T, K, C, r, E, rows_per, dropout_p, scale,
        HAS_DROPOUT=dropout_p > 0.0, HAS_SEQ_ID=has_seq_id, SPLIT_K=split, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        BLOCK_K=cfg.block_k, **dot_args(x.dtype), num_warps=cfg.num_warps,
    )
    if split > 1:
        tk._shrink_finalize_kernel[(cdiv(T, cfg.block_m), cdiv(C, cfg.block_c))](
            partial, gates, scaling, H, Hg, seq_id, T, C, r, E, rows_per, HAS_SEQ_ID=has_seq_id, SPLIT_K=split,
            BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        )
    return H, Hg


# Configs whose TMA kernel failed to compile on this machine, with the reason: they run the pointer kernel from then
# on. Reported by `personafuse check` and in every bench row (tma_fallbacks), not only in a one-time warning.
TMA_FALLBACKS: dict = {}


def _compile_errors() -> tuple:
    """The exceptions that mean "this config does not compile here" (nothing was launched), so falling back is
    safe: Triton's front-end and resource errors, ptxas failures, and an MLIR pass manager failure (a RuntimeError
    that names the PassManager). Anything else, a launch failure for instance, propagates."""
    import triton.compiler.errors as compiler_errors
    import triton.runtime.errors as runtime_errors

    names = (("CompilationError", compiler_errors), ("OutOfResources", runtime_errors), ("PTXASError", runtime_errors))
    return tuple(getattr(mod, name) for name, mod in names if hasattr(mod, name))


def _is_compile_failure(exc: Exception) -> bool:
    return isinstance(exc, _compile_errors()) or (isinstance(exc, RuntimeError) and "PassManager" in str(exc))


_ALLOCATOR_SET = threading.local()


def _set_tma_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator; Triton asks for one through set_allocator. Set once
    per thread (Triton keeps it in a context variable, which a new thread does not inherit), not per launch."""
    if getattr(_ALLOCATOR_SET, "done", False):
        return
    import triton

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR_SET.done = True


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base pointers and row strides of contiguous 2D operands."""
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


class IdleRows(NamedTuple):
    """The gates of the rows a dual GEMM computes: a row tile whose gates are all zero (requests without an adapter)
    skips the LoRA segment. gates [G, E] fp32; seq_len tokens per row or the packed row map."""
    gates: torch.Tensor
    seq_len: object


def _idle_args(idle: IdleRows | None, stand_in) -> tuple:
    """(GATES, SEQ_ID, E, SEQ_LEN) pointers and sizes, and the constexprs SKIP_IDLE, HAS_SEQ_ID, E_PAD."""
    if idle is None:
        return (stand_in, stand_in, 1, 1), {"SKIP_IDLE": False, "HAS_SEQ_ID": False, "E_PAD": 16}
    seq_id, rows_per, has_seq_id = _rows(idle.seq_len, idle.gates)
    E = idle.gates.shape[1]
    return (idle.gates, seq_id, E, rows_per), {"SKIP_IDLE": True, "HAS_SEQ_ID": has_seq_id, "E_PAD": pow2(E, 16)}


def dual_gemm_tma(out, *, x1, m1, x2, m2, bias, seed, dropout_p: float, cfg: GemmConfig, m_trans: bool,
                  dropout_term2: bool, idle: IdleRows | None = None) -> bool:
    """Persistent TMA dual GEMM: out [M, N] = x1 op(m1) + d * (x2 op(m2)) (+ bias), with op(m) = m^T for m [N, K]
    when m_trans, else m [K, N]; d is drop' when dropout_term2. Every operand is a dense 2D tensor with 16-byte
    aligned rows. Returns False (nothing launched) when it cannot run here."""
    if not cfg.tma or cfg in TMA_FALLBACKS or not _tma_ok(out, x1, m1, x2, m2):
        return False
    M, N = out.shape
    sms = num_sms(out.device)
    grid = (min(sms, cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)),)
    check_dot_tiles(cfg.block_m, cfg.block_n, cfg.block_k, cfg.block_k2)
    if out.is_cuda:
        _set_tma_allocator()
    try:
        (gates, seq_id, E, rows_per), skip = _idle_args(idle, out)
        tk._dual_gemm_tma_kernel[grid](
            x1, m1, x2, m2, _or_unused(bias, out), out, seed, gates, seq_id, M, N, x1.shape[1], x2.shape[1], E,
            rows_per, dropout_p, 1.0 / (1.0 - dropout_p),
            M_TRANS=m_trans, HAS_BIAS=bias is not None, DROPOUT_TERM2=dropout_term2, **skip,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_K2=cfg.block_k2, GROUP_M=cfg.group_m,
            NUM_SMS=sms, NUM_STAGES=cfg.num_stages, WARP_SPECIALIZE=cfg.warp_specialize,
            **dot_args(out.dtype), num_warps=cfg.num_warps,
        )
    except Exception as exc:
        if not _is_compile_failure(exc):
            raise
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        TMA_FALLBACKS[cfg] = reason
        warnings.warn(f"personafuse: the TMA dual-GEMM kernel failed to compile ({reason}); using the pointer "
                      f"kernel for this config (personafuse check lists such fallbacks)")
        return False
    return True


def _or_unused(pointer, stand_in):
    """A kernel pointer argument that a constexpr flag turns off (HAS_BIAS=False, say) still needs a tensor: any
    valid one, never read. Named here so call sites say which arguments are such stand-ins."""
    return pointer if pointer is not None else stand_in


def dual_gemm(out, *, x1, m1, m1_strides, x2, m2, m2_strides, R: int, bias, seed, dropout_p: float, cfg: GemmConfig,
              has_term1: bool, accumulate: bool, dropout_term2: bool, idle: IdleRows | None = None):
    """out [M, N] (+)= x1 [M, K1] M1 + d * (x2 [M, K2] M2) (+ bias). M1 element (k, n) at k*s_k + n*s_n;
    M2 row c at (c // R) * s_e + (c % R) * s_j, column n at n * s_n."""
    M, N = out.shape
    K1 = x1.shape[1] if has_term1 else 0
    K2 = x2.shape[1]
    if M == 0:
        return out
    s_m1k, s_m1n = m1_strides
    s_m2e, s_m2j, s_m2n = m2_strides
    block_n = cfg.pointer_block_n
    grid = (cdiv(M, cfg.block_m) * cdiv(N, block_n),)
    check_dot_tiles(cfg.block_m, block_n, cfg.block_k, cfg.block_k2)
    (gates, seq_id, E, rows_per), skip = _idle_args(idle, out)
    tk._dual_gemm_kernel[grid](
        x1, m1, x2, m2, _or_unused(bias, out), out, seed, gates, seq_id,
        M, N, K1, K2, R, E, rows_per,
        x1.stride(0), x1.stride(1), s_m1k, s_m1n,
        x2.stride(0), x2.stride(1), s_m2e, s_m2j, s_m2n,
        out.stride(0), out.stride(1),
        dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_TERM1=has_term1, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, DROPOUT_TERM2=dropout_term2, **skip,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, BLOCK_K2=cfg.block_k2, GROUP_M=cfg.group_m,
        **dot_args(x2.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


class Call(NamedTuple):
    """Sizes, launch config and float32 gate tensors of one forward or backward call."""
    T: int
    K: int
    N: int
    E: int
    r: int
    C: int
    cfgs: Configs
    gates32: torch.Tensor  # [G, E]
    scaling32: torch.Tensor  # [E]


def _prepare(x, N: int, lora_A, gates, scaling) -> Call:
    T, K = x.shape
    E, r, _ = lora_A.shape
    return Call(T, K, N, E, r, E * r, _configs_for(x, K, N, E * r), gates.float().contiguous(),
                scaling.float().contiguous())


def forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float):
    """Returns (y [T, N], H [T, E*r]). Same contract as routed_lora_torch.forward."""
    T, K, N, E, r, C, cfgs, gates32, scaling32 = _prepare(x, weight.shape[0], lora_A, gates, scaling)
    H, Hg = shrink(x, lora_A, gates32, scaling32, seed, seq_len, dropout_p, cfgs.shrink)
    cfg = cfgs.gemm
    idle = IdleRows(gates32, seq_len)  # row tiles of requests without an adapter skip the LoRA segment
    # lora_B [E, N, r] read as B_cat^T: row c = (e, j) at e*N*r + j, column n at n*r
    b_strides = (N * r, 1, r)
    if cfg.fuse_base and cfg.tma and T > SMALL_T:
        y = x.new_empty(T, N)
        B_cat = lora_B.permute(1, 0, 2).reshape(N, C)  # [N, C] copy (N*C elements) for a dense descriptor
        if dual_gemm_tma(y, x1=x, m1=weight, x2=Hg, m2=B_cat, bias=bias, seed=seed, dropout_p=0.0, cfg=cfg,
                         m_trans=True, dropout_term2=False, idle=idle):
            return y, H
    if cfg.fuse_base:
        y = x.new_empty(T, N)
        dual_gemm(y, x1=x, m1=weight, m1_strides=(1, K), x2=Hg, m2=lora_B, m2_strides=b_strides, R=r, bias=bias,
                  seed=seed, dropout_p=0.0, cfg=cfg, has_term1=True, accumulate=False, dropout_term2=False, idle=idle)
    else:
        y = F.linear(x, weight, bias)
        _expand_into(y, Hg, lora_B, seed, cfgs.gemm, idle)
    return y, H


def _expand_into(out, Hg, lora_B, seed, cfg: GemmConfig, idle: IdleRows):
    """out [T, N] += Hg B_cat^T in place, out in any float dtype (its dtype is what the kernel stores)."""
    E, N, r = lora_B.shape
    # lora_B [E, N, r] read as B_cat^T: row c = (e, j) at e*N*r + j, column n at n*r; no first term (x1, m1 unused)
    dual_gemm(out, x1=_or_unused(None, Hg), m1=_or_unused(None, lora_B), m1_strides=(0, 0), x2=Hg, m2=lora_B,
              m2_strides=(N * r, 1, r), R=r, bias=None, seed=seed, dropout_p=0.0, cfg=cfg, has_term1=False,
              accumulate=True, dropout_term2=False, idle=idle)


def delta_forward(out, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float):
    """out [T, N] += sum_e s_e g (drop(x) A_e^T) B_e^T in place (any float dtype of out, an fp32 accumulator
    included); returns H [T, E*r]. Same contract as routed_lora_torch.delta_forward."""
    T, K, N, E, r, C, cfgs, gates32, scaling32 = _prepare(x, out.shape[1], lora_A, gates, scaling)
    H, Hg = shrink(x, lora_A, gates32, scaling32, seed, seq_len, dropout_p, cfgs.shrink)
    _expand_into(out, Hg, lora_B, seed, cfgs.gemm, IdleRows(gates32, seq_len))
    return H




def dhg(dy, lora_B, H, gates, scaling, seq_len, cfg: DhgConfig):
    """(dH [T, C] in H's dtype, dg_tok [T, E] fp32) from dy [T, N]."""
    T, N = dy.shape
    E, _, r = lora_B.shape
    dH = torch.empty_like(H)
    dg_tok = torch.empty(T, E, dtype=torch.float32, device=dy.device)
    if T == 0:
        return dH, dg_tok
    r_pad = pow2(r)
    # whole experts per tile, about 64 columns, never fewer than 16 (tl.dot), masked past E
    experts_per_block = max(min(pow2(E), max(1, 64 // r_pad)), cdiv(16, r_pad))
    grid = (cdiv(E, experts_per_block), cdiv(T, cfg.block_m))  # expert blocks of a row block adjacent
    check_dot_tiles(cfg.block_m, cfg.block_n, experts_per_block * r_pad)
    seq_id, rows_per, has_seq_id = _rows(seq_len, gates)
    tk._dhg_kernel[grid](
        dy, lora_B, H, gates, scaling, dH, dg_tok, seq_id, T, N, r, E, rows_per,
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        HAS_SEQ_ID=has_seq_id, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EXPERTS_PER_BLOCK=experts_per_block,
        R_PAD=r_pad,
        **dot_args(dy.dtype), num_warps=cfg.num_warps,
    )
    return dH, dg_tok


def wgrad_B(dy, H, gates32, scaling32, seed, *, r: int, seq_len, cfg: WgradConfig) -> torch.Tensor:
    """dB_cat [N, C] fp32 = dY^T Hg, with Hg = H * s_e g rebuilt from H on load; dy [T, N], H [T, C]."""
    return _tn_gemm(dy, H, dy.shape[1], H.shape[1], tk.Q_GATED.value, gates32, scaling32, seed, r, seq_len, 0.0, cfg)


def wgrad_A(dH, x, gates32, scaling32, seed, *, r: int, seq_len, dropout_p: float, cfg: WgradConfig
            ) -> torch.Tensor:
    """dA_cat [C, K] fp32 = dH^T drop(x), the dropout mask regenerated from the seed; dH [T, C], x [T, K]."""
    q_mode = (tk.Q_DROPOUT if dropout_p > 0 else tk.Q_PLAIN).value
    return _tn_gemm(dH, x, dH.shape[1], x.shape[1], q_mode, gates32, scaling32, seed, r, seq_len, dropout_p, cfg)


def _tn_gemm(p, q, I: int, J: int, q_mode, gates, scaling, seed, r: int, seq_len, dropout_p: float,
             cfg: WgradConfig):
    """out [I, J] fp32 = P^T q over T; p [T, I], q [T, J], q as q_mode says (triton_kernels.Q_*)."""
    T = p.shape[0]
    tiles = cdiv(I, cfg.block_i) * cdiv(J, cfg.block_j)
    atomic = _atomic_reduce()
    split = 1 if T == 0 else _split_t(T, tiles, cfg.block_t, p.device)
    if atomic or split == 1:
        out = torch.zeros(I, J, dtype=torch.float32, device=p.device)
    else:
        out = torch.empty(split, I, J, dtype=torch.float32, device=p.device)
    if T == 0:
        return out
    E = gates.shape[1]
    check_dot_tiles(cfg.block_i, cfg.block_j, cfg.block_t)
    seq_id, rows_per, has_seq_id = _rows(seq_len, gates)
    tk._tn_gemm_kernel[(cdiv(I, cfg.block_i), cdiv(J, cfg.block_j), split)](
        p, q, gates, scaling, seed, out, seq_id, T, I, J, r, E, rows_per,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        out.stride(0) if out.dim() == 3 else 0, out.stride(-2), out.stride(-1),
        dropout_p, 1.0 / (1.0 - dropout_p),
        Q_MODE=q_mode, HAS_SEQ_ID=has_seq_id, ATOMIC=atomic, SPLIT_T=split, BLOCK_I=cfg.block_i,
        BLOCK_J=cfg.block_j, BLOCK_T=cfg.block_t,
        **dot_args(p.dtype), num_warps=cfg.num_warps,
    )
    return out.sum(0) if out.dim() == 3 else out


def backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p: float, needs):
    """(dx, dW, db, dA, dB, dgates); same contract as routed_lora_torch.backward."""
    need_dx, need_dW, need_db, need_dA, need_dB, need_dg = needs
    call = _prepare(x, weight.shape[0], lora_A, gates, scaling)
    dH, dA, dB, dg = _lora_grads(dy, x, lora_A, lora_B, gates, seed, H, seq_len, dropout_p, call,
                                 need_dA, need_dB, need_dg)
    T, K, N, E, r, C, cfgs = call[:7]
    dx = dy.new_empty(0)
    if need_dx:  # dx = dY W + drop'(dH A_cat) in one pass
        dx = x.new_empty(T, K)
        # idle row tiles skip the LoRA segment, but not with dropout: there the TMA kernel's Philox mask and the
        # gate check together spill (sm_90a, Triton 3.8; tests/test_triton_aot.py)
        idle = IdleRows(call.gates32, seq_len) if dropout_p == 0 else None
        launched = False
        if T > SMALL_T:
            launched = dual_gemm_tma(dx, x1=dy, m1=weight, x2=dH, m2=lora_A.view(C, K), bias=None, seed=seed,
                                     dropout_p=dropout_p, cfg=cfgs.gemm, m_trans=False, dropout_term2=dropout_p > 0,
                                     idle=idle)
        if not launched:
            # dY [T, N] @ W [N, K]: element (n, k) at n*K + k; lora_A [E, r, K]: row c at e*r*K + j*K
            dual_gemm(dx, x1=dy, m1=weight, m1_strides=(K, 1), x2=dH, m2=lora_A, m2_strides=(r * K, K, 1), R=r,
                      bias=None, seed=seed, dropout_p=dropout_p, cfg=cfgs.gemm, has_term1=True, accumulate=False,
                      dropout_term2=dropout_p > 0, idle=idle)
    dW, db = routed_lora_torch.base_weight_grads(dy, x, need_dW, need_db)
    return dx, dW, db, dA, dB, dg


def delta_backward(dy, x, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p: float, needs):
    """(dx, dA, dB, dgates) of the LoRA term alone; same contract as routed_lora_torch.delta_backward."""
    need_dx, need_dA, need_dB, need_dg = needs
    call = _prepare(x, lora_B.shape[1], lora_A, gates, scaling)
    dH, dA, dB, dg = _lora_grads(dy, x, lora_A, lora_B, gates, seed, H, seq_len, dropout_p, call,
                                 need_dA, need_dB, need_dg)
    T, K, N, E, r, C, cfgs = call[:7]
    dx = dy.new_empty(0)
    if need_dx:  # dx = drop'(dH A_cat): the dual GEMM without its first term
        dx = x.new_empty(T, K)
        dual_gemm(dx, x1=_or_unused(None, dH), m1=_or_unused(None, lora_A), m1_strides=(0, 0), x2=dH, m2=lora_A,
                  m2_strides=(r * K, K, 1), R=r, bias=None, seed=seed, dropout_p=dropout_p, cfg=cfgs.gemm,
                  has_term1=False, accumulate=False, dropout_term2=dropout_p > 0,
                  idle=IdleRows(call.gates32, seq_len) if dropout_p == 0 else None)
    return dx, dA, dB, dg


def _lora_grads(dy, x, lora_A, lora_B, gates, seed, H, seq_len, dropout_p: float, call: Call, need_dA: bool,
                need_dB: bool, need_dg: bool):
    """(dH [T, C], dA, dB, dgates) of one backward: the dHg kernel, then the two weight-gradient reductions."""
    T, K, N, E, r, C, cfgs, gates32, scaling32 = call
    dH, dg_tok = dhg(dy, lora_B, H, gates32, scaling32, seq_len, cfgs.dhg)
    dB = dy.new_empty(0)
    if need_dB:
        dB_cat = wgrad_B(dy, H, gates32, scaling32, seed, r=r, seq_len=seq_len, cfg=cfgs.wgrad_b)  # [N, C]
        dB = dB_cat.view(N, E, r).permute(1, 0, 2).to(lora_B.dtype).contiguous()
    dA = dy.new_empty(0)
    if need_dA:
        dA = wgrad_A(dH, x, gates32, scaling32, seed, r=r, seq_len=seq_len, dropout_p=dropout_p,
                     cfg=cfgs.wgrad_a).view(E, r, K).to(lora_A.dtype)
    if need_dg:
        G = gates.shape[0]
        dg = row_sums(dg_tok, G, seq_len).to(gates.dtype)
    else:
        dg = gates.new_empty(0)
    return dH, dA, dB, dg
