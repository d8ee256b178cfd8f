"""``routed_lora``: the public functional op. Validates once, normalizes, dispatches, runs autograd."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import RoutedLoRADeltaFunction, RoutedLoRAFunction, RoutedLoRATopKFunction, delta_term
from .dispatch import resolve_backend, resolve_topk_backend
from .ops.dropout import keep_mask, new_seed
from .ops.routed_lora_torch import routed_lora_reference
from .routing.gates import NormalizedGates, normalize_gates, packed_rows, token_gates
from .routing.topk import TopKGates


def _shape(t: Optional[Tensor]):
    return None if t is None else tuple(t.shape)


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _validate(x, weight, bias, lora_A, lora_B, gates, dropout_p) -> None:
    """weight None: the routed term alone (routed_lora_delta), N taken from lora_B."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., K], got a scalar")
    if weight is not None:
        _check_tensor("weight", weight, 2)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    _check_tensor("lora_A", lora_A, 3)
    _check_tensor("lora_B", lora_B, 3)
    if isinstance(gates, TopKGates):
        gates.check(lora_A.shape[0] if isinstance(lora_A, Tensor) and lora_A.dim() == 3 else 1)
        if tuple(gates.indices.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(f"top-k gates are per token: indices must be {tuple(x.shape[:-1]) + (gates.k,)} for x "
                             f"{tuple(x.shape)}, got {tuple(gates.indices.shape)}")
        gates_t = gates.weights
    else:
        _check_tensor("gates", gates)
        gates_t = gates
    K = x.shape[-1]
    N = weight.shape[0] if weight is not None else lora_B.shape[1]
    E, r, KA = lora_A.shape
    EB, NB, rB = lora_B.shape
    shapes = (f"x {_shape(x)}, weight {_shape(weight)}, bias {_shape(bias)}, lora_A {_shape(lora_A)}, "
              f"lora_B {_shape(lora_B)}, gates {gates if isinstance(gates, TopKGates) else _shape(gates)}")
    if weight is not None and weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {K}; got {shapes}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be [N] with N = weight.shape[0] = {N}; got {shapes}")
    if E < 1 or r < 1:
        raise ValueError(f"lora_A must be [E, r, K] with E >= 1 and r >= 1; got {shapes}")
    if KA != K:
        raise ValueError(f"lora_A must be [E, r, K] with K = x.shape[-1] = {K}; got {shapes}")
    if EB != E:
        raise ValueError(f"lora_A and lora_B disagree on the number of experts E ({E} vs {EB}); got {shapes}")
    if NB != N:
        raise ValueError(f"lora_B must be [E, N, r] with N = weight.shape[0] = {N}; got {shapes}")
    if rB != r:
        raise ValueError(f"lora_A and lora_B disagree on the rank r ({r} vs {rB}); got {shapes}")
    named = [("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B), ("gates", gates_t)]
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
    dtypes = {name: t.dtype for name, t in named[:5] if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            f"x, weight, bias, lora_A and lora_B must share one dtype; got "
            f"{', '.join(f'{k} {v}' for k, v in dtypes.items())}"
        )
    if gates_t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"gates must be float32 or x's dtype {x.dtype}; got {gates_t.dtype}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _scaling_tensor(scaling, E: int, x: Tensor) -> Tensor:
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(scaling, Tensor):
        if scaling.requires_grad:
            raise ValueError("scaling is a constant (alpha / r per expert): pass a tensor that does not require grad")
        if scaling.dim() == 0:
            scaling = scaling.reshape(1).expand(E)
        if scaling.shape != (E,):
            raise ValueError(f"scaling must be a float or a tensor [E] = [{E}], got shape {tuple(scaling.shape)}")
        if scaling.device != x.device:
            raise ValueError(f"scaling must be on x's device {x.device}, got {scaling.device}")
        return scaling.to(cdt).contiguous()
    if isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        return torch.full((E,), float(scaling), dtype=cdt, device=x.device)
    raise TypeError(f"scaling must be a float or a tensor [E], got {type(scaling).__name__}")


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "hpu", "mps")


def _autocast(tensors, device_type: str):
    """Under torch.autocast, run the op in the autocast dtype (like F.linear does)."""
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [None if t is None else t.to(dtype) for t in tensors]


def _rank_list(ranks, E: int, r: int) -> Optional[tuple]:
    """ranks [E] (a list or an int tensor; values 0..r) as a tuple, or None when every expert has the full rank.
    A tensor on a GPU is read once on the host (layers pass a list: no sync)."""
    if ranks is None:
        return None
    if isinstance(ranks, Tensor):
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.dim() != 1:
            raise TypeError(f"ranks must be an int tensor [E] or a list of ints, got {ranks.dtype} "
                            f"{tuple(ranks.shape)}")
        ranks = ranks.tolist()
    values = list(ranks)
    if len(values) != E or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise ValueError(f"ranks must be {E} ints (one per expert), got {values!r}")
    if any(not 0 <= v <= r for v in values):
        raise ValueError(f"ranks must be in [0, r = {r}] (lora_A is [E, r, K], padded to the largest rank), got "
                         f"{values}")
    return None if all(v == r for v in values) else tuple(int(v) for v in values)


def _rank_columns(ranks: tuple, r: int, device) -> tuple[Tensor, Tensor]:
    """(flat columns e * r + j for j < ranks[e], the expert of each): the columns an expert really has."""
    cols = [e * r + j for e, n in enumerate(ranks) for j in range(n)]
    owner = [e for e, n in enumerate(ranks) for _ in range(n)]
    return (torch.tensor(cols, dtype=torch.long, device=device), torch.tensor(owner, dtype=torch.long, device=device))


def _by_rank_column(lora_A: Tensor, lora_B: Tensor, gates, scale: Tensor, ranks: tuple):
    """Experts of unequal ranks as sum(ranks) experts of rank 1, one per real column: the kernels then compute
    exactly sum(ranks) columns (not E * r_max), and the padding columns get no work and no gradient. Gathers are
    differentiable: gradients flow back to the padded lora_A / lora_B (zero past each rank) and to the gates
    (summed over each expert's columns)."""
    E, r, K = lora_A.shape
    N = lora_B.shape[1]
    cols, owner = _rank_columns(ranks, r, lora_A.device)
    A1 = lora_A.reshape(E * r, K).index_select(0, cols).unsqueeze(1)  # [C', 1, K]
    B1 = lora_B.permute(0, 2, 1).reshape(E * r, N).index_select(0, cols).unsqueeze(2)  # [C', N, 1]
    g1 = gates.index_select(-1, owner)
    return A1, B1, g1, scale.index_select(0, owner)


def _ranked(ranks, x: Tensor, lora_A: Tensor, lora_B: Tensor, gates, scaling) -> Optional[tuple]:
    """None when every expert has lora_A's rank (the plain path); () when every expert has rank 0; else the
    operands as rank-1 columns (_by_rank_column), top-k gates densified: what routed_lora and routed_lora_delta
    run instead."""
    E, r = lora_A.shape[0], lora_A.shape[1]
    rank_tuple = _rank_list(ranks, E, r)
    if rank_tuple is None:
        return None
    if sum(rank_tuple) == 0:
        return ()
    if isinstance(gates, TopKGates):
        gates = gates.to_dense(E)  # unequal ranks run the dense path
    return _by_rank_column(lora_A, lora_B, gates, _scaling_tensor(scaling, E, x), rank_tuple)


def _check_cu_seqlens(cu_seqlens, x: Tensor, gates) -> None:
    """cu_seqlens [B + 1] of packed sequences in x [T, K] with per-sequence gates [B, E]: 0 = c_0 <= ... <= c_B = T.
    On a GPU the value checks are device-side asserts (no host sync); on a CPU they raise here."""
    if isinstance(gates, TopKGates):
        raise ValueError("cu_seqlens gives per-sequence gates [B, E] to packed tokens; top-k gates are per token")
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a tensor [B + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [B + 1] (one start per sequence, then T), got {tuple(cu_seqlens.shape)}")
    if x.dim() != 2:
        raise ValueError(f"with cu_seqlens, x must be the packed tokens [T, K], got {tuple(x.shape)}")
    B = cu_seqlens.numel() - 1
    if gates.dim() != 2 or gates.shape[0] != B:
        raise ValueError(f"with cu_seqlens [B + 1] = {tuple(cu_seqlens.shape)}, gates must be [B, E] = [{B}, E] (one "
                         f"mix per packed sequence), got {tuple(gates.shape)}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens must be on x's device {x.device}, got {cu_seqlens.device}")
    T = x.shape[0]
    if cu_seqlens.device.type == "meta":
        return
    ok_first, ok_last = cu_seqlens[0] == 0, cu_seqlens[-1] == T
    ok_order = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    if cu_seqlens.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok_first & ok_last & ok_order, "cu_seqlens must start at 0, end at T and not decrease")
        return
    if not bool(ok_first) or not bool(ok_last):
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}; got {cu_seqlens[0].item()} ... "
                         f"{cu_seqlens[-1].item()}")
    if not bool(ok_order):
        raise ValueError(f"cu_seqlens must not decrease (sequence lengths >= 0), got {cu_seqlens.tolist()}")


def _normalized(gates, x: Tensor, E: int, cu_seqlens) -> NormalizedGates:
    """The gates as the backends take them: [G, E] with tokens per row, or with the packed row map."""
    if cu_seqlens is not None:
        return NormalizedGates(gates.contiguous(), packed_rows(cu_seqlens, x.shape[0]))
    return normalize_gates(gates, x.shape, E)


def _degenerate(x, weight, bias, lora_A, lora_B, gates, scale, seed, p: float, cu_seqlens=None) -> Tensor:
    """Shapes no kernel is built for, which nn.Linear accepts: no tokens (x [0, K], or sequences of length 0),
    K = 0 or N = 0, and meta tensors (shape inference, meta-device init). The per-expert reference through
    autograd gives the right shape, values and (zero where nothing was computed) gradients."""
    E = lora_A.shape[0]
    K, N = x.shape[-1], weight.shape[0]
    T = math.prod(x.shape[:-1])
    if isinstance(gates, TopKGates):
        gates = gates.to_dense(E)
    norm = _normalized(gates, x, E, cu_seqlens)
    x2 = x.reshape(T, K)
    keep = keep_mask(seed, T, K, p) if p > 0.0 else None
    y = routed_lora_reference(x2, weight, bias, lora_A, lora_B, token_gates(norm.gates, norm.seq_len), scale,
                              keep=keep, dropout_p=p)
    return y.reshape(*x.shape[:-1], N)


def routed_lora(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    gates: Union[Tensor, TopKGates],
    scaling: Union[float, Tensor] = 1.0,
    dropout_p: float = 0.0,
    backend: str = "auto",
    cu_seqlens: Optional[Tensor] = None,
    ranks=None,
) -> Tensor:
    """y = x W^T + b + sum_e s_e * g[t, e] * (drop(x) A_e^T) B_e^T

    Args:
        x:       [..., K] input tokens
        weight:  [N, K] base projection; bias: [N] or None
        lora_A:  [E, r, K] every expert's lora_A (peft's layout, stacked)
        lora_B:  [E, N, r] every expert's lora_B
        gates:   [..., E] with x's leading dims (per token), or with one leading dim fewer than x, e.g.
                 [B, E] for x [B, S, K] (per sequence). float32 or x's dtype. Or TopKGates(indices [..., k],
                 weights [..., k]) per token: only the k chosen experts are computed (grouped kernels) when
                 E * r is large enough for that to pay, else the dense path with zeros off the top-k.
        scaling: float, or tensor [E] (alpha / r per expert)
        dropout_p: dropout on the LoRA branch's input (pass 0 in eval); the mask is regenerated in backward
        backend: "auto", "torch", "triton" or "cuda" (PERSONAFUSE_BACKEND overrides "auto")
        cu_seqlens: [B + 1] int32/int64, for x [T, K] holding B sequences back to back (flash-attention's varlen
                 convention: 0 = c_0 <= ... <= c_B = T) and gates [B, E]: sequence b's tokens use gates[b].
                 The kernels read a [T] int32 row map built on the device; gradients reach gates [B, E].
        ranks:   [E] ints (a list, or an int tensor): expert e's rank, storage padded to lora_A's r. Columns at or
                 past ranks[e] are not computed and get zero gradients; the work follows sum(ranks).
    Returns:
        y [..., N] in x's dtype. Gradients flow to x, weight, bias, lora_A, lora_B and gates.
    """
    _validate(x, weight, bias, lora_A, lora_B, gates, dropout_p)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, x, gates)
    ranked = _ranked(ranks, x, lora_A, lora_B, gates, scaling)
    if ranked is not None:
        if not ranked:  # every expert has rank 0
            return F.linear(x, weight, bias)
        A1, B1, g1, s1 = ranked
        return routed_lora(x, weight, bias, A1, B1, g1, scaling=s1, dropout_p=dropout_p, backend=backend,
                           cu_seqlens=cu_seqlens)
    x, weight, bias, lora_A, lora_B = _autocast([x, weight, bias, lora_A, lora_B], x.device.type)
    E, r = lora_A.shape[0], lora_A.shape[1]
    K, N = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    T = math.prod(lead)
    scale = _scaling_tensor(scaling, E, x)
    p = float(dropout_p)
    seed = new_seed(x.device) if p > 0.0 else torch.empty(0, dtype=torch.int64, device=x.device)
    if x.device.type == "meta":
        return _degenerate(x, weight, bias, lora_A, lora_B, gates, scale, seed, p, cu_seqlens)
    name = resolve_backend(backend, x.device, x.dtype, T)  # a forced backend that cannot run still raises
    if T == 0 or K == 0 or N == 0:
        return _degenerate(x, weight, bias, lora_A, lora_B, gates, scale, seed, p, cu_seqlens)
    # the kernels' layout: x [T, K], every operand contiguous
    operands = (x.reshape(T, K).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                lora_A.contiguous(), lora_B.contiguous())
    if isinstance(gates, TopKGates):
        grouped = resolve_topk_backend(name, E, r, gates.k, x.device)
        if grouped is not None:
            indices = gates.indices.reshape(-1, gates.k).contiguous()
            weights = gates.weights.reshape(-1, gates.k).contiguous()
            y = RoutedLoRATopKFunction.apply(*operands, indices, weights, scale, seed, p, grouped)
            return y.view(*lead, N)
        gates = gates.to_dense(E)  # the dense stacked path, zeros off the top-k
    norm = _normalized(gates, x, E, cu_seqlens)
    y = RoutedLoRAFunction.apply(*operands, norm.gates, scale, seed, norm.seq_len, p, name)
    return y.view(*lead, N)


def routed_lora_delta(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    gates: Union[Tensor, TopKGates],
    scaling: Union[float, Tensor] = 1.0,
    dropout_p: float = 0.0,
    backend: str = "auto",
    out: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    ranks=None,
) -> Tensor:
    """The routed term alone, sum_e s_e * g[t, e] * (drop(x) A_e^T) B_e^T, for a base computed elsewhere (a
    quantized layer, an engine's GEMM, an fp32 accumulator).

    Args:
        x, lora_A, lora_B, gates, scaling, dropout_p, backend: as routed_lora.
        out: [..., N] in any float dtype on x's device, or None. Given, the term is added into it in place and
             out is returned; autograd records an in-place add, as out.add_(delta) would (out may not be a leaf
             that requires grad). None: a new tensor in x's dtype holding the term.
        cu_seqlens, ranks: packed sequences and per-expert ranks, as routed_lora.
    Top-k gates run the dense path here (zeros off the top-k).
    """
    _validate(x, None, None, lora_A, lora_B, gates, dropout_p)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, x, gates)
    ranked = _ranked(ranks, x, lora_A, lora_B, gates, scaling)
    if ranked is not None:
        if not ranked:  # every expert has rank 0: the term is zero
            return out if out is not None else torch.zeros(*x.shape[:-1], lora_B.shape[1], dtype=x.dtype,
                                                           device=x.device)
        A1, B1, g1, s1 = ranked
        return routed_lora_delta(x, A1, B1, g1, scaling=s1, dropout_p=dropout_p, backend=backend, out=out,
                                 cu_seqlens=cu_seqlens)
    E = lora_A.shape[0]
    K, N = x.shape[-1], lora_B.shape[1]
    lead = x.shape[:-1]
    if out is None:
        out = torch.zeros(*lead, N, dtype=x.dtype, device=x.device)
    elif not isinstance(out, Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"out must be a floating-point tensor, got {got}")
    elif tuple(out.shape) != (*lead, N):
        raise ValueError(f"out must be [..., N] = {(*lead, N)} for x {tuple(x.shape)} and lora_B "
                         f"{tuple(lora_B.shape)}, got {tuple(out.shape)}")
    elif out.device != x.device:
        raise ValueError(f"out must be on x's device {x.device}, got {out.device}")
    elif out.is_leaf and out.requires_grad:
        raise RuntimeError("out is a leaf that requires grad: an in-place add into it would be lost to autograd; "
                           "add into a copy (out.clone()) or a buffer that does not require grad")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous (its rows are the kernels' output rows)")
    x, lora_A, lora_B = _autocast([x, lora_A, lora_B], x.device.type)
    T = math.prod(lead)
    scale = _scaling_tensor(scaling, E, x)
    p = float(dropout_p)
    seed = new_seed(x.device) if p > 0.0 else torch.empty(0, dtype=torch.int64, device=x.device)
    if isinstance(gates, TopKGates):
        gates = gates.to_dense(E)
    norm = _normalized(gates, x, E, cu_seqlens)
    x2 = x.reshape(T, K).contiguous()
    if x.device.type == "meta" or T == 0 or K == 0 or N == 0 or torch.compiler.is_compiling():
        # torch ops (torch.compile traces them; meta tensors and empty shapes need no kernel)
        term = delta_term(x2, lora_A, lora_B, norm.gates, scale, seed, norm.seq_len, p) if T and K and N else None
        return out if term is None else out.add_(term.view(*lead, N).to(out.dtype))
    name = resolve_backend(backend, x.device, x.dtype, T)
    return RoutedLoRADeltaFunction.apply(out, x2, lora_A.contiguous(), lora_B.contiguous(), norm.gates, scale, seed,
                                         norm.seq_len, p, name)
