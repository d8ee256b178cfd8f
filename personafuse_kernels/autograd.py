"""The routed LoRA op as torch.library custom ops, and the autograd Function that ties them together.

    personafuse::routed_lora_forward(x, weight, bias?, lora_A, lora_B, gates, scaling, seed, seq_len, seq_ids?,
                                     dropout_p, backend) -> (y [T, N], H [T, E*r])
    personafuse::routed_lora_backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, H, seq_len, seq_ids?,
                                      dropout_p, needs..., backend) -> (dx, dW, db, dA, dB, dgates)
seq_ids: the row map [T] int32 of packed sequences (cu_seqlens), which then replaces seq_len.

Both carry fake (meta) implementations, so torch.compile(fullgraph=True) traces a model with routed layers
as one opaque op per call, whichever backend runs it. Inputs are the normalized ones of
functional.routed_lora (x [T, K], gates [G, E], seq_len tokens per gate row).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .dispatch import get_backend_ops, topk_block_m


class Needs(NamedTuple):
    """Which gradients a backward computes, by name: the backends' `needs` argument, in this order."""
    x: bool
    weight: bool
    bias: bool
    lora_A: bool
    lora_B: bool
    gates: bool  # dense gates, or the top-k routing weights

    @classmethod
    def of(cls, ctx, gates_at: int = 5) -> "Needs":
        """From ctx.needs_input_grad of a forward whose inputs start x, weight, bias, lora_A, lora_B and hold the
        gates at position gates_at; bias only when there was one."""
        need = ctx.needs_input_grad
        return cls(need[0], need[1], need[2] and ctx.has_bias, need[3], need[4], need[gates_at])

    def keep(self, grads) -> tuple:
        """The six gradients with None where not needed (a backend returns empty tensors there)."""
        return tuple(g if wanted else None for g, wanted in zip(grads, self))


def routed_lora_forward_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, gates: Tensor,
    scaling: Tensor, seed: Tensor, seq_len: int, seq_ids: Optional[Tensor], dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor]:
    ops = get_backend_ops(backend)
    rows = seq_ids if seq_ids is not None else seq_len
    return ops.forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, rows, dropout_p)


routed_lora_forward_op = torch.library.custom_op("personafuse::routed_lora_forward", mutates_args=())(
    routed_lora_forward_impl
)


@routed_lora_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, seq_ids, dropout_p, backend):
    E, r, _ = lora_A.shape
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], E * r)


def _grad_like(t, wanted: bool, shape=None):
    """Fake gradient output: t's shape (or `shape`) when wanted, else an empty tensor (as the backends return)."""
    return t.new_empty(shape if shape is not None else t.shape) if wanted else t.new_empty(0)


def routed_lora_backward_impl(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, gates: Tensor, scaling: Tensor,
    seed: Tensor, H: Tensor, seq_len: int, seq_ids: Optional[Tensor], dropout_p: float, need_dx: bool,
    need_dW: bool, need_db: bool,
    need_dA: bool, need_dB: bool, need_dgates: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops = get_backend_ops(backend)
    needs = Needs(need_dx, need_dW, need_db, need_dA, need_dB, need_dgates)
    rows = seq_ids if seq_ids is not None else seq_len
    return ops.backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, H, rows, dropout_p, needs)


routed_lora_backward_op = torch.library.custom_op("personafuse::routed_lora_backward", mutates_args=())(
    routed_lora_backward_impl
)


@routed_lora_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, gates, *rest):
    return _fake_grads(dy, x, weight, lora_A, lora_B, gates, Needs(*rest[-7:-1]))


def _fake_grads(dy, x, weight, lora_A, lora_B, gates, needs: Needs) -> tuple:
    """The six gradients' fake tensors (both backward ops; gates: the dense gates or the top-k weights)."""
    return (_grad_like(x, needs.x), _grad_like(weight, needs.weight), _grad_like(dy, needs.bias, (weight.shape[0],)),
            _grad_like(lora_A, needs.lora_A), _grad_like(lora_B, needs.lora_B), _grad_like(gates, needs.gates))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def differentiable_backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, seq_len: int, dropout_p: float,
                            needs: tuple[bool, bool, bool, bool, bool, bool]):
    """The first-order gradients (dx, dW, db, dA, dB, dgates) as a graph of torch ops, for backward with
    create_graph=True on any backend: the torch backend's backward (the reference formulas) with H recomputed
    from x and lora_A, so second-order gradients reach every input, dy included. Dropout regenerates the same
    mask from the seed."""
    from .ops import routed_lora_torch
    from .ops.dropout import apply_dropout

    E, r, K = lora_A.shape
    H = apply_dropout(x, seed, dropout_p) @ lora_A.reshape(E * r, K).t()  # [T, E*r], with its graph this time
    return routed_lora_torch.backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p,
                                      needs)


class RoutedLoRAFunction(torch.autograd.Function):
    """Forward and backward of the routed LoRA op (no autograd through ops).

    Under torch.compile the custom ops above are what gets traced (one opaque node each); in eager mode the
    backend is called directly, which skips the dispatcher's per-call overhead (about 10 us a call on CPU,
    measured with T = 1) that matters for decoding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p, backend):
        # seq_len: tokens per gate row, or the row map seq_ids [T] int32 of packed sequences
        seq_ids = seq_len if isinstance(seq_len, Tensor) else None
        n = 0 if seq_ids is not None else seq_len
        op = torch.ops.personafuse.routed_lora_forward if _compiling() else routed_lora_forward_impl
        y, H = op(x, weight, bias, lora_A, lora_B, gates, scaling, seed, n, seq_ids, dropout_p, backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, gates, scaling, seed, H)
        ctx.seq_len, ctx.dropout_p, ctx.backend = seq_len, dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, gates, scaling, seed, H = ctx.saved_tensors
        needs = Needs.of(ctx)  # forward's inputs: x, weight, bias, lora_A, lora_B, gates, then constants
        if torch.is_grad_enabled() and not _compiling():
            # create_graph=True (a gradient penalty, Hessian-vector products): the gradients must themselves be
            # differentiable, which the fused kernels' outputs (and the saved H, cut from x and lora_A) are not.
            grads = differentiable_backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, ctx.seq_len,
                                            ctx.dropout_p, needs)
        else:
            op = torch.ops.personafuse.routed_lora_backward if _compiling() else routed_lora_backward_impl
            seq_ids = ctx.seq_len if isinstance(ctx.seq_len, Tensor) else None
            grads = op(dy.contiguous(), x, weight, lora_A, lora_B, gates, scaling, seed, H,
                       0 if seq_ids is not None else ctx.seq_len, seq_ids,
                       ctx.dropout_p, *needs, ctx.backend)
        return (*needs.keep(grads), None, None, None, None, None)


# ---------------------------------------------------------------- top-k gates (grouped path)
#   personafuse::routed_lora_topk_forward(x, weight, bias?, lora_A, lora_B, indices, weights, scaling, seed, block_m,
#       dropout_p, backend) -> (y [T, N], saved, <routing metadata>)
#   saved: H [T*k, r] (triton, cuda: per pair) or [T, E*r] (torch reference). The forward launches the base GEMM,
#   then builds the routing metadata (so the GPU runs the GEMM while the host issues the metadata's launches) and
#   returns it, as RoutingMeta.op_args()'s four tensors, for the backward op (a custom op's schema takes tensors
#   and scalars, not a tuple).

def _meta(op_args, lora_A, indices):
    from .routing.topk import RoutingMeta

    return RoutingMeta.from_op_args(*op_args, num_experts=lora_A.shape[0], k=indices.shape[1])


def routed_lora_topk_forward_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, indices: Tensor,
    weights: Tensor, scaling: Tensor, seed: Tensor, block_m: int, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops = get_backend_ops(backend, topk=True)
    y, saved, meta = ops.forward(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, dropout_p, block_m)
    return (y, saved, *meta.op_args()[:4])


routed_lora_topk_forward_op = torch.library.custom_op("personafuse::routed_lora_topk_forward", mutates_args=())(
    routed_lora_topk_forward_impl
)


@routed_lora_topk_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, block_m, dropout_p, backend):
    saved = get_backend_ops(backend, topk=True).saved_like(x, lora_A, indices)
    P, G = indices.numel(), lora_A.shape[0] * indices.shape[1]
    max_blocks = -(-P // block_m) + G
    i32 = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(x.shape[0], weight.shape[0]), saved, torch.empty(P, **i32), torch.empty(G + 1, **i32),
            torch.empty(max_blocks, **i32), torch.empty(max_blocks, **i32))


def routed_lora_topk_backward_impl(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, indices: Tensor, weights: Tensor,
    scaling: Tensor, seed: Tensor, saved: Tensor, sorted_pairs: Tensor, group_start: Tensor, block_group: Tensor,
    block_start: Tensor, block_m: int, dropout_p: float, need_dx: bool, need_dW: bool, need_db: bool,
    need_dA: bool, need_dB: bool, need_dweights: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    meta = _meta((sorted_pairs, group_start, block_group, block_start, block_m), lora_A, indices)
    needs = Needs(need_dx, need_dW, need_db, need_dA, need_dB, need_dweights)
    return get_backend_ops(backend, topk=True).backward(dy, x, weight, lora_A, lora_B, indices, weights, scaling,
                                                        seed, saved, dropout_p, meta, needs)


routed_lora_topk_backward_op = torch.library.custom_op("personafuse::routed_lora_topk_backward", mutates_args=())(
    routed_lora_topk_backward_impl
)


@routed_lora_topk_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, indices, weights, *rest):
    return _fake_grads(dy, x, weight, lora_A, lora_B, weights, Needs(*rest[-7:-1]))


class RoutedLoRATopKFunction(torch.autograd.Function):
    """Top-k routed LoRA: routing metadata built once by the forward op (device ops, no sync), reused by backward.
    Gradients reach x, weight, bias, lora_A, lora_B and the routing weights; indices carry none."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, dropout_p, backend):
        block_m = topk_block_m(backend, *indices.shape)
        op = torch.ops.personafuse.routed_lora_topk_forward if _compiling() else routed_lora_topk_forward_impl
        y, saved, *tensors = op(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, block_m, dropout_p,
                                backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, indices, weights, scaling, seed, saved, *tensors)
        ctx.block_m, ctx.dropout_p, ctx.backend, ctx.has_bias = block_m, dropout_p, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, indices, weights, scaling, seed, saved, *tensors = ctx.saved_tensors
        # forward's inputs: x, weight, bias, lora_A, lora_B, indices (no gradient), weights, then constants
        needs = Needs.of(ctx, gates_at=6)
        if torch.is_grad_enabled() and not _compiling():  # create_graph=True: see RoutedLoRAFunction.backward
            from .routing.topk import dense_gates, slot_values

            dense = dense_gates(indices, weights, lora_A.shape[0])  # [T, E]
            dx, dW, db, dA, dB, dg = differentiable_backward(dy, x, weight, lora_A, lora_B, dense, scaling, seed, 1,
                                                             ctx.dropout_p, needs)
            grads = (dx, dW, db, dA, dB, slot_values(dg, indices) if needs.gates else None)
        else:
            op = torch.ops.personafuse.routed_lora_topk_backward if _compiling() else routed_lora_topk_backward_impl
            grads = op(dy.contiguous(), x, weight, lora_A, lora_B, indices, weights, scaling, seed, saved, *tensors,
                       ctx.block_m, ctx.dropout_p, *needs, ctx.backend)
        dx, dW, db, dA, dB, dw = needs.keep(grads)
        return (dx, dW, db, dA, dB, None, dw, None, None, None, None)


# ---------------------------------------------------------------- the routed term alone, added into `out`


def delta_term(x, lora_A, lora_B, gates, scaling, seed, seq_len: int, dropout_p: float):
    """sum_e s_e g (drop(x) A_e^T) B_e^T [T, N] as a graph of torch ops (torch.compile, meta tensors, and the
    differentiable backward of create_graph=True)."""
    from .ops import routed_lora_torch
    from .ops.dropout import apply_dropout

    E, r, K = lora_A.shape
    H = apply_dropout(x, seed, dropout_p) @ lora_A.reshape(E * r, K).t()
    Hg = routed_lora_torch.TorchGateOps.forward(H, gates, scaling, seq_len)
    return Hg @ routed_lora_torch._b_cat(lora_B).t()


class RoutedLoRADeltaFunction(torch.autograd.Function):
    """out += the routed LoRA term, in place: autograd records it as an in-place add on out (ctx.mark_dirty), as
    out.add_(delta) would be, without materializing delta. out [T, N] in any float dtype; x [T, K] and the rest as
    RoutedLoRAFunction takes them."""

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p, backend):
        H = get_backend_ops(backend).delta_forward(out.view(x.shape[0], -1), x, lora_A, lora_B, gates, scaling, seed,
                                                   seq_len, dropout_p)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_A, lora_B, gates, scaling, seed, H)
        ctx.seq_len, ctx.dropout_p, ctx.backend = seq_len, dropout_p, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        x, lora_A, lora_B, gates, scaling, seed, H = ctx.saved_tensors
        need = ctx.needs_input_grad  # out, x, lora_A, lora_B, gates, then constants
        wanted = (need[1], need[2], need[3], need[4])
        dy = dout.reshape(x.shape[0], -1).to(x.dtype).contiguous()
        if torch.is_grad_enabled():  # create_graph=True: differentiate the term rebuilt from torch ops
            inputs = [t for t, w in zip((x, lora_A, lora_B, gates), wanted) if w]
            term = delta_term(x, lora_A, lora_B, gates, scaling, seed, ctx.seq_len, ctx.dropout_p)
            got = iter(torch.autograd.grad(term, inputs, dy, create_graph=True, allow_unused=True))
            grads = [next(got) if w else None for w in wanted]
        else:
            grads = get_backend_ops(ctx.backend).delta_backward(dy, x, lora_A, lora_B, gates, scaling, seed, H,
                                                                ctx.seq_len, ctx.dropout_p, wanted)
            grads = [g if w else None for g, w in zip(grads, wanted)]
        return (dout, *grads, None, None, None, None, None)
