"""Top-k gates and the routing metadata the grouped kernels share between forward and backward.

    TopKGates(indices [..., k] int32 or int64, weights [..., k] float): token t uses experts indices[t, :] with
    weights weights[t, :]; index -1 is a slot with no adapter (its weight is ignored, its gradient is zero).
    Equivalent to dense gates g[t, e] = sum of weights[t, s] over the slots with indices[t, s] == e, else 0.

Pairs: p = t * k + s (token t, slot s), expert e(p) = indices[t, s]. The metadata sorts pairs by group
g = e * k + s (expert-major, so one expert's pairs are contiguous; slot-minor, so a block never mixes slots)
and cuts every group into blocks of BLOCK_M pairs: a kernel program takes one block, gathers its tokens' rows
and uses one expert's weights. Sizes are static (at most cdiv(P, BLOCK_M) + E*k blocks) and everything is
computed on the device: no host sync, so CUDA graphs replay it.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor


class TopKGates:
    """indices [..., k] (int32 or int64: each token's k distinct experts, or -1 for a slot with no adapter),
    weights [..., k] (float, carry gradients).

    validate=True (the default for user-made gates) checks dtypes, shapes, range and duplicates before any kernel
    runs: on the host for CPU tensors; on a GPU as device-side asserts (no host sync; a failure is raised by the
    next synchronizing call), or on the host with validate_now(E), which syncs once and names the bad values. The
    check is remembered for these very indices (the same tensor, not modified in place since) and the largest
    index seen, so reusing the gates skips it, while a layer with fewer experts, or indices changed in place,
    checks again. Routers make their gates with validate=False (top-k of a softmax is valid by construction):
    those are trusted as they are.
    """

    __slots__ = ("indices", "weights", "trusted", "_checked")

    def __init__(self, indices: Tensor, weights: Tensor, validate: bool = True):
        self.indices = indices
        self.weights = weights
        self.trusted = not validate
        self._checked: tuple | None = None  # (weak reference to the indices, their version, largest index)

    def _checked_for(self, num_experts: int) -> bool:
        """These indices passed the full check, have not changed in place since, and fit num_experts."""
        if self._checked is None:
            return False
        ref, version, hi = self._checked
        return ref() is self.indices and self.indices._version == version and hi < num_experts

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def check(self, num_experts: int) -> None:
        """Raise ValueError/TypeError naming what is wrong; cheap once these indices were checked for at least
        num_experts experts."""
        idx, w = self.indices, self.weights
        if not isinstance(idx, Tensor) or not isinstance(w, Tensor):
            raise TypeError("TopKGates needs tensors: indices [..., k] int32/int64 and weights [..., k] float")
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"TopKGates indices must be int32 or int64, got {idx.dtype}")
        if not w.is_floating_point():
            raise TypeError(f"TopKGates weights must be floating point, got {w.dtype}")
        if idx.shape != w.shape or idx.dim() < 1 or idx.shape[-1] < 1:
            raise ValueError(f"TopKGates indices and weights must share a shape [..., k] with k >= 1; got indices "
                             f"{tuple(idx.shape)} and weights {tuple(w.shape)}")
        if idx.device != w.device:
            raise ValueError(f"TopKGates indices on {idx.device} but weights on {w.device}")
        if idx.shape[-1] > num_experts:
            raise ValueError(f"top-k with k = {idx.shape[-1]} > E = {num_experts} experts")
        if self.trusted or idx.numel() == 0 or idx.device.type == "meta":  # meta tensors have no values to check
            return
        if torch.compiler.is_compiling():  # no host sync inside a graph
            self._device_checks(num_experts)
            return
        if self._checked_for(num_experts):
            return
        if idx.is_cuda:  # no host sync on a GPU: device-side asserts, raised by the next synchronizing call
            self._device_checks(num_experts)
            self._checked = (weakref.ref(idx), idx._version, num_experts - 1)
            return
        self.validate_now(num_experts)

    def _device_checks(self, num_experts: int) -> None:
        idx = self.indices
        ok = (idx >= -1).all() & (idx < num_experts).all()
        torch._assert_async(ok, "TopKGates indices out of range [-1, num_experts)")
        if idx.shape[-1] > 1:
            torch._assert_async(~_repeats(idx).any(), "TopKGates indices repeat an expert")

    def validate_now(self, num_experts: int) -> None:
        """The range and duplicate checks on the host, with messages that name the bad values: one host sync on a
        GPU (check() uses device-side asserts there instead, to keep the call free of syncs)."""
        idx = self.indices
        lo, hi = int(idx.min()), int(idx.max())  # the host sync
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"TopKGates indices must be in [0, {num_experts}), or -1 for no adapter; got values "
                             f"from {lo} to {hi}")
        if idx.shape[-1] > 1:
            dup = _repeats(idx).any(dim=-1)
            if bool(dup.any()):
                where = tuple(int(v) for v in dup.nonzero()[0])
                raise ValueError(f"TopKGates indices repeat an expert within a token (first at token {where}: "
                                 f"{idx[where].tolist()}); each token's k experts must be distinct")
        self._checked = (weakref.ref(idx), idx._version, hi)

    def to_dense(self, num_experts: int) -> Tensor:
        """Dense gates [..., E] (differentiable in weights): the reference semantics."""
        return dense_gates(self.indices, self.weights, num_experts)

    def __repr__(self):
        return f"TopKGates(indices={tuple(self.indices.shape)}, weights={tuple(self.weights.shape)})"


def block_m_for(T: int, k: int, large: int = 64) -> int:
    """Pairs per metadata block (BLOCK_M) for T tokens of k slots: 16 for small batches, where a 64-pair tile would
    be mostly padding, else one full tile of `large` (64: the grouped kernels' row tile)."""
    return 16 if T * k <= 1024 else large


def _repeats(idx: Tensor) -> Tensor:
    """[..., k-1] bool: after sorting each token's slots, a real expert (not -1) equal to its neighbour."""
    s = idx.sort(dim=-1).values
    return (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)


def _slot_onehot(indices: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """[..., k, E]: 1 where slot s picks expert e; a -1 slot is all zeros. Any integer dtype (int32 needs no copy
    to int64, which scatter and gather would)."""
    return (indices.unsqueeze(-1) == torch.arange(num_experts, device=indices.device, dtype=indices.dtype)).to(dtype)


def dense_gates(indices: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """g[..., e] = sum of weights[..., s] over the slots s with indices[..., s] == e: [..., k] -> [..., E].

    A sum, not an overwrite: gates built with validate=False may repeat an expert within a token, and every path
    (this dense one, and the grouped kernels, which add one slot at a time) must then add both slots. A -1 slot
    (no adapter) adds nothing."""
    return (_slot_onehot(indices, num_experts, weights.dtype) * weights.unsqueeze(-1)).sum(-2)


def slot_values(dense: Tensor, indices: Tensor) -> Tensor:
    """dense [..., E] read at each slot's expert: [..., k], 0 for a -1 slot (the top-k weights' gradient from the
    dense gates' gradient)."""
    return (_slot_onehot(indices, dense.shape[-1], dense.dtype) * dense.unsqueeze(-2)).sum(-1)


class RoutingMeta(NamedTuple):
    """Device-side routing metadata of one batch (see the module docstring). P = T * k pairs, G = E * k groups."""
    sorted_pairs: Tensor  # [P] int32: pair ids in group order
    group_start: Tensor  # [G + 1] int32: offsets of each group in sorted_pairs (last = P)
    block_group: Tensor  # [MAXB] int32: group of each block, -1 past the last block
    block_start: Tensor  # [MAXB] int32: first position (in sorted_pairs) of each block
    block_m: int
    num_experts: int
    k: int

    def op_args(self) -> tuple:
        """The fields a custom op takes, in its schema's order (tensors, then block_m); from_op_args undoes it.
        torch.library ops take tensors and scalars, not this tuple, so they list these five arguments."""
        return self.sorted_pairs, self.group_start, self.block_group, self.block_start, self.block_m

    @classmethod
    def from_op_args(cls, sorted_pairs, group_start, block_group, block_start, block_m: int, *, num_experts: int,
                     k: int) -> "RoutingMeta":
        return cls(sorted_pairs, group_start, block_group, block_start, block_m, num_experts, k)


def build_routing_metadata(indices: Tensor, num_experts: int, block_m: int,
                           use_kernels: bool | None = None) -> RoutingMeta:
    """indices [T, k] int32/int64 (valid, or -1: no adapter) -> RoutingMeta, on indices' device with no host sync.

    use_kernels: three Triton launches (ops/routing_triton.py) instead of the reference's torch ops; by default
    where they pay, on a GPU with Triton (and in a dry run that simulates one). Both give the same metadata."""
    if use_kernels is None:
        use_kernels = _metadata_kernels_available(indices)
    if use_kernels and indices.numel():
        from ..ops.routing_triton import build_routing_metadata_kernels

        return build_routing_metadata_kernels(indices, num_experts, block_m)
    return build_routing_metadata_reference(indices, num_experts, block_m)


def _metadata_kernels_available(indices: Tensor) -> bool:
    from ..ops.launch_configs import simulated_card

    if not (indices.is_cuda or simulated_card() is not None):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def build_routing_metadata_reference(indices: Tensor, num_experts: int, block_m: int) -> RoutingMeta:
    """The metadata with torch ops (the reference the Triton builder is held to), on indices' device, no host
    sync. A -1 pair sorts after every group (the sentinel group G): it is in sorted_pairs but in no group
    and no block, so no kernel computes it."""
    T, k = indices.shape
    P, G = T * k, num_experts * k
    dev = indices.device
    slot = torch.arange(k, device=dev).repeat(T)
    flat = indices.reshape(-1)
    group = torch.where(flat >= 0, flat * k + slot, G)  # [P] int64, G for no adapter
    order = torch.sort(group, stable=True).indices  # pairs sorted by (expert, slot), token order inside
    counts = torch.zeros(G + 1, dtype=torch.int64, device=dev).scatter_add_(0, group, torch.ones_like(group))[:G]
    group_start = torch.zeros(G + 1, dtype=torch.int64, device=dev)
    group_start[1:] = torch.cumsum(counts, 0)
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)  # [G]
    max_blocks = -(-P // block_m) + G
    j = torch.arange(max_blocks, device=dev)
    g_of_j = torch.searchsorted(block_end, j, right=True)  # [MAXB], == G past the last block
    valid = g_of_j < G
    g_safe = g_of_j.clamp(max=G - 1)
    local = j - (block_end[g_safe] - blocks[g_safe])
    block_start = group_start[g_safe] + local * block_m
    return RoutingMeta(order.to(torch.int32), group_start.to(torch.int32),
                       torch.where(valid, g_safe, -1).to(torch.int32), block_start.to(torch.int32),
                       block_m, num_experts, k)
