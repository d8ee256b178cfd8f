"""Launch configs of the Triton kernels: one small frozen config per op, from ``get_config(op, t_bucket, ...)``.

    op        kernels it configures                                 config
    shrink    _shrink_kernel, _shrink_finalize_kernel               ShrinkConfig
    gemm      _dual_gemm_kernel, _dual_gemm_tma_kernel              GemmConfig
    dhg       _dhg_kernel                                           DhgConfig
    wgrad_a   _tn_gemm_kernel as wgrad_A (dA_cat = dH^T drop(x))     WgradConfig
    wgrad_b   _tn_gemm_kernel as wgrad_B (dB_cat = dY^T Hg)          WgradConfig
    pair      _grouped_pair_gemm_kernel (top-k shrink and dHg)      PairConfig
    expand    _grouped_expand_kernel (top-k y and dx)               ExpandConfig
    expert_wgrad  _grouped_wgrad_kernel (top-k dA, dB)              ExpertWgradConfig
    router    _topk_router_fwd_kernel, _topk_router_bwd_kernel      RouterConfig

This module imports neither torch nor triton on purpose: the ahead-of-time compile gate loads it by path in a
side environment that holds only a Triton wheel (tests/aot_compile.py), so the configs it checks are the very
ones the launchers use.

The defaults are heuristics from the cost model (docs/cost-model.md): large T is compute-bound on the base GEMM
(128-row tiles, grouped order, Hopper's TMA + wgmma), T <= SMALL_T is bandwidth-bound (narrow N tiles so many
programs stream W once, split-K shrink so many SMs read lora_A). A measured table overrides them per card and per
op: ``triton_configs/<device name, spaces as _>/<op>.json`` mapping "T<=bucket" to field overrides (written by
benchmarks/tune_triton.py). Nothing is tuned on the hot path; lookups are cached.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

TUNED_DIR = Path(__file__).with_name("triton_configs")
SMALL_T = 64  # decode-sized batches: split-K shrink, narrow output tiles
INTERPRETER = "interpreter"  # the device name under TRITON_INTERPRET=1 (few, large programs)


_SIMULATED = contextvars.ContextVar("personafuse_simulated_card", default=None)


@contextlib.contextmanager
def simulate_card(device_name: str, sms: int):
    """While active, the launchers pick configs, grids and splits as they would on this card (its name as
    torch.cuda.get_device_name spells it, and its SM count), whatever tensors they get, and nothing counts as
    running in Triton's interpreter: `personafuse explain` dry-runs the real launchers on meta tensors this way."""
    token = _SIMULATED.set((device_name, int(sms)))
    try:
        yield
    finally:
        _SIMULATED.reset(token)


def simulated_card() -> tuple[str, int] | None:
    """(device name, SM count) of the card simulate_card set, or None."""
    return _SIMULATED.get()


def token_bucket(tokens: int) -> int:
    """T rounded up to a power of two: the key ("T<=bucket") of the launch-config and dispatch tables."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """The power of two at or above n, clamped to [lo, hi] (tile sizes: tl.arange needs powers of two)."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def is_hopper(device_name: str) -> bool:
    """H100 / H200 / H20 / H800: TMA and wgmma (torch.cuda.get_device_name spells them "NVIDIA H...")."""
    return device_name.startswith("NVIDIA H")


@dataclass(frozen=True)
class ShrinkConfig:
    """H = drop(x) A_cat^T: [block_m, block_c] output tiles over block_k slices of K; split_k > 1 (T <= SMALL_T
    only) writes fp32 partials that _shrink_finalize_kernel sums."""
    block_m: int
    block_c: int
    block_k: int
    split_k: int
    num_warps: int


@dataclass(frozen=True)
class GemmConfig:
    """The dual GEMM out = X1 M1 + X2 M2: [block_m, block_n] tiles, block_k over K1 and block_k2 over K2 = C.
    fuse_base: y's base term in the same kernel (else cuBLAS F.linear, then the LoRA term accumulated in place).
    tma: the persistent TMA kernel (Hopper) when the operands' strides allow it, else the pointer kernel."""
    block_m: int
    block_n: int
    block_k: int
    block_k2: int
    group_m: int
    fuse_base: bool
    tma: bool
    warp_specialize: bool
    num_warps: int
    num_stages: int

    @property
    def pointer_block_n(self) -> int:
        """N tile of the pointer kernel. Where the TMA kernel is the default (tma), the pointer kernel is its
        fallback and stays at 128: at Hopper's 128x256 its dropout mask spills 8-9 KB (sm_90a, both Tritons)."""
        return min(self.block_n, 128) if self.tma else self.block_n


@dataclass(frozen=True)
class DhgConfig:
    """dHg = dY B_cat: block_m rows of T, block_n slices of N; the expert block width follows from r (launcher)."""
    block_m: int
    block_n: int
    num_warps: int


@dataclass(frozen=True)
class WgradConfig:
    """out [I, J] = P^T Q over T in block_t steps, [block_i, block_j] tiles, T split for about two SM waves."""
    block_i: int
    block_j: int
    block_t: int
    num_warps: int


@dataclass(frozen=True)
class PairConfig:
    """Top-k grouped shrink / dHg: block_l columns of the reduction (K or N) per step; the pair-block height comes
    from the routing metadata (routing.topk.block_m_for), which the expand and wgrad kernels share."""
    block_l: int
    num_warps: int


@dataclass(frozen=True)
class ExpandConfig:
    """Top-k grouped expand: block_n output columns per program, one launch per slot."""
    block_n: int
    num_warps: int


@dataclass(frozen=True)
class ExpertWgradConfig:
    """Top-k per-expert weight gradients: tiles up to max_block wide, block_t pairs per step, at most max_split
    chunks of each expert's pairs."""
    max_block: int
    block_t: int
    max_split: int
    num_warps: int


@dataclass(frozen=True)
class RouterConfig:
    """Fused top-k router: block_m tokens per program, block_k slices of K for the logits GEMM."""
    block_m: int
    block_k: int
    num_warps: int


def _shrink(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> ShrinkConfig:
    if interpret:
        return ShrinkConfig(block_m=64, block_c=pow2(C, 16, 256), block_k=64, split_k=2 if small else 1, num_warps=4)
    if small:  # split K so that lora_A [C, K] is read by many SMs at once
        return ShrinkConfig(block_m=16, block_c=pow2(C, 16, 64), block_k=128, split_k=max(1, min(16, K // 512)),
                            num_warps=4)
    return ShrinkConfig(block_m=64, block_c=fitting_block(C, 32, 128), block_k=64, split_k=1, num_warps=8)


def fitting_block(C: int, lo: int, hi: int) -> int:
    """The power-of-two tile width in [lo, hi] that pads C least (the widest among equals): C = E*r = 160 takes
    5 tiles of 32 (no padding), where one width of 128 would compute 256 columns, 37.5 % of them zeros. The tiles
    of one row block run side by side, so x's rows come from L2 after the first."""
    widths = [w for w in (16, 32, 64, 128, 256) if lo <= w <= hi] or [lo]
    return min(widths, key=lambda w: (-(-C // w) * w, -w))


def _gemm(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> GemmConfig:
    if interpret:
        return GemmConfig(block_m=64, block_n=64, block_k=64, block_k2=pow2(C, 16, 64), group_m=4, fuse_base=True,
                          tma=False, warp_specialize=False, num_warps=4, num_stages=1)
    if small:  # narrow N tiles: N / 32 programs stream W once
        return GemmConfig(block_m=16, block_n=32, block_k=128, block_k2=pow2(C, 16, 64), group_m=1, fuse_base=True,
                          tma=False, warp_specialize=False, num_warps=4, num_stages=4)
    # Hopper: 128x256x64, 8 warps, 3 stages, persistent with TMA (the tile of the calibration, docs/cost-model.md)
    return GemmConfig(block_m=128, block_n=256 if hopper else 128, block_k=64, block_k2=32, group_m=8,
                      fuse_base=True, tma=hopper, warp_specialize=False, num_warps=8, num_stages=3)


def _dhg(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> DhgConfig:
    if interpret:
        return DhgConfig(block_m=64, block_n=64, num_warps=4)
    if small:
        return DhgConfig(block_m=16, block_n=128, num_warps=4)
    return DhgConfig(block_m=64, block_n=64, num_warps=8)


def _wgrad_a(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> WgradConfig:
    # 64x64 tiles, 4 warps: at 64x128 with 8 warps ptxas serializes the wgmma of the p = 0 kernel (C7515, sm_90a,
    # Triton 3.6), and with 4 warps the dropout kernel spills (Triton 3.8); this one is clean under both.
    return WgradConfig(block_i=64, block_j=64, block_t=64, num_warps=4)


def _wgrad_b(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> WgradConfig:
    if interpret or small:
        return WgradConfig(block_i=64, block_j=64, block_t=64, num_warps=4)
    return WgradConfig(block_i=64, block_j=128, block_t=64, num_warps=8)


def _pair(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> PairConfig:
    return PairConfig(block_l=64, num_warps=4)


def _expand(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> ExpandConfig:
    return ExpandConfig(block_n=64, num_warps=4)


def _expert_wgrad(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> ExpertWgradConfig:
    return ExpertWgradConfig(max_block=64, block_t=32, max_split=1 if interpret else 8, num_warps=4)


def _router(small: bool, interpret: bool, K: int, C: int, hopper: bool) -> RouterConfig:
    return RouterConfig(block_m=32, block_k=64, num_warps=4)


HEURISTICS = {"shrink": _shrink, "gemm": _gemm, "dhg": _dhg, "wgrad_a": _wgrad_a, "wgrad_b": _wgrad_b,
              "pair": _pair, "expand": _expand, "expert_wgrad": _expert_wgrad, "router": _router}
OPS = tuple(HEURISTICS)


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str, op: str) -> dict:
    """The measured overrides for one op on one card, {"T<=bucket": {field: value}}; {} when none is checked in."""
    path = TUNED_DIR / device_name.replace(" ", "_") / f"{op}.json"
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    return {bucket: dict(overrides) for bucket, overrides in table.items()}


@functools.lru_cache(maxsize=1024)
def get_config(op: str, t_bucket: int, K: int, N: int, C: int, device_name: str, interpret: bool = False):
    """The launch config of ``op`` for T in (t_bucket / 2, t_bucket] on ``device_name`` (torch's spelling, or
    INTERPRETER): the heuristic, then the card's tuned table for that op and bucket if there is one. Cached, so
    a call costs one dict lookup."""
    try:
        heuristic = HEURISTICS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; ops with launch configs: {', '.join(OPS)}") from None
    small = t_bucket <= SMALL_T
    cfg = heuristic(small, interpret, K, C, is_hopper(device_name))
    overrides = tuned_table(device_name, op).get(f"T<={t_bucket}")
    if overrides:
        known = {f.name for f in fields(cfg)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"triton_configs/{device_name.replace(' ', '_')}/{op}.json T<={t_bucket}: unknown "
                             f"fields {unknown}; {type(cfg).__name__} has {sorted(known)}")
        cfg = replace(cfg, **overrides)
    return cfg
