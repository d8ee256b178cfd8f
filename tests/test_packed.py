"""Packed sequences: x [T, K] holding B sequences back to back, per-sequence gates [B, E] and cu_seqlens [B + 1]
(flash-attention's varlen convention). Every backend (torch; Triton in the interpreter; cuda in the emulator, in
test_cuda_backend_emulated.py) against a float64 per-expert loop whose per-token gates are gathered by hand,
forward and every gradient (gates' included), with sequence lengths 1, 7, 0 and 133."""
import pytest
import torch

import personafuse_kernels as pfk
from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference

LENGTHS = [1, 7, 0, 133]
BACKENDS = ["torch"] + (["triton"] if "triton" in pfk.available_backends() else [])
NAMES = ["y", "x", "weight", "bias", "lora_A", "lora_B", "gates"]


def packed_case(lengths=LENGTHS, K=33, N=45, E=5, r=8, seed=0, cu_dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).requires_grad_()  # noqa: E731
    ins = {"x": t(T, K), "weight": t(N, K, scale=K**-0.5), "bias": t(N), "lora_A": t(E, r, K, scale=K**-0.5),
           "lora_B": t(E, N, r, scale=r**-0.5), "gates": torch.rand(len(lengths), E, generator=gen).requires_grad_()}
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=cu_dtype)
    return ins, cu


def by_hand(ins, lengths, scaling, dy):
    """float64 loop; token t of sequence b reads gates[b], gathered row by row."""
    d = {n: v.detach().double().requires_grad_() for n, v in ins.items()}
    rows = [d["gates"][b] for b, n in enumerate(lengths) for _ in range(n)]
    gates_tok = torch.stack(rows) if rows else d["gates"][:0]
    y = routed_lora_reference(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], gates_tok, scaling.double())
    grads = torch.autograd.grad(y, [d[n] for n in NAMES[1:]], dy.double())
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_sequences_match_the_loop(backend, cu_dtype):
    ins, cu = packed_case(cu_dtype=cu_dtype)
    scaling = torch.linspace(0.5, 2.0, 5)
    y = pfk.routed_lora(*(ins[n] for n in NAMES[1:]), scaling=scaling, backend=backend, cu_seqlens=cu)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = [y.detach(), *torch.autograd.grad(y, [ins[n] for n in NAMES[1:]], dy)]
    for a, b, n in zip(got, by_hand(ins, LENGTHS, scaling, dy), NAMES):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{backend} {n}: {m}")
    assert torch.all(got[-1][2] == 0), "the empty sequence's gates get no gradient"


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_packed_dropout_same_mask_on_every_backend(backend):
    ins, cu = packed_case(lengths=[3, 9, 5], seed=1)
    outs = []
    for name in ("torch", backend):
        torch.manual_seed(7)
        y = pfk.routed_lora(*(ins[n] for n in NAMES[1:]), scaling=2.0, dropout_p=0.3, backend=name, cu_seqlens=cu)
        outs.append([y.detach(), *torch.autograd.grad(y.sum(), [ins["x"], ins["lora_A"], ins["gates"]])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_delta(backend):
    ins, cu = packed_case(lengths=[4, 0, 6])
    base = torch.nn.functional.linear(ins["x"], ins["weight"], ins["bias"]).detach()
    out = base.clone()
    pfk.routed_lora_delta(ins["x"], ins["lora_A"], ins["lora_B"], ins["gates"], scaling=2.0, backend=backend,
                          out=out, cu_seqlens=cu)
    want = pfk.routed_lora(*(ins[n] for n in NAMES[1:]), scaling=2.0, backend="torch", cu_seqlens=cu).detach()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_packed_equals_padded_per_sequence_gates():
    """Equal lengths packed with cu_seqlens give what x [B, S, K] with gates [B, E] gives."""
    ins, cu = packed_case(lengths=[6, 6, 6])
    packed = pfk.routed_lora(*(ins[n] for n in NAMES[1:]), backend="torch", cu_seqlens=cu)
    padded = pfk.routed_lora(ins["x"].view(3, 6, -1), *(ins[n] for n in NAMES[2:]), backend="torch")
    torch.testing.assert_close(packed, padded.view(18, -1))


@pytest.mark.parametrize("cu,err,match", [
    (torch.tensor([1, 3, 5]), ValueError, "start at 0"),
    (torch.tensor([0, 3, 4]), ValueError, "end at T"),
    (torch.tensor([0, 4, 3, 5]), ValueError, "B \\+ 1"),
    (torch.tensor([0, 4, 2]), ValueError, "end at T"),
    (torch.tensor([[0, 5]]), ValueError, "\\[B \\+ 1\\]"),
    (torch.tensor([0.0, 5.0]), TypeError, "int32 or int64"),
])
def test_bad_cu_seqlens_raise(cu, err, match):
    ins, _ = packed_case(lengths=[2, 3])
    with pytest.raises(err, match=match):
        pfk.routed_lora(*(ins[n] for n in NAMES[1:]), backend="torch", cu_seqlens=cu)


def test_decreasing_cu_seqlens_raise():
    ins, _ = packed_case(lengths=[2, 3])
    gates = torch.rand(3, 5)
    with pytest.raises(ValueError, match="must not decrease"):
        pfk.routed_lora(*(ins[n] for n in NAMES[1:6]), gates, backend="torch", cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match="top-k gates are per token"):
        pfk.routed_lora(*(ins[n] for n in NAMES[1:6]), pfk.TopKGates(torch.zeros(5, 1, dtype=torch.long),
                                                                     torch.ones(5, 1)),
                        backend="torch", cu_seqlens=torch.tensor([0, 2, 5]))


def test_layer_with_a_sequence_router_pools_each_packed_sequence():
    """RoutedLoRALinear(router="sequence").forward(x, cu_seqlens=): one mix per packed sequence, pooled over its
    own tokens: the same as running each sequence alone."""
    from personafuse_kernels.modules import RoutedLoRALinear

    torch.manual_seed(0)
    layer = RoutedLoRALinear(torch.nn.Linear(16, 12), num_experts=4, rank=4, router="sequence")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    lengths = [3, 5, 2]
    x = torch.randn(sum(lengths), 16)
    cu = torch.tensor([0, 3, 8, 10])
    packed = layer(x, cu_seqlens=cu)
    alone = torch.cat([layer(part.unsqueeze(0)).squeeze(0) for part in x.split(lengths)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with pfk.hold_sequence_gates(layer):
        layer(x, cu_seqlens=cu)  # the prompt: gates computed and held
        torch.testing.assert_close(layer(x, cu_seqlens=cu), packed, rtol=1e-5, atol=1e-5)
    external = torch.softmax(torch.randn(3, 4), -1)
    y = layer(x, gates=external, cu_seqlens=cu)
    want = torch.cat([layer(part, gates=external[b]) for b, part in enumerate(x.split(lengths))])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
