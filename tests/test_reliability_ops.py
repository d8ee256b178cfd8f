"""Reliability of the op and the layer: top-k checks tied to E and to the indices, repeated experts summed on
every path, shapes nn.Linear accepts (no tokens, K = 0, meta tensors), merge misuse, persona_gates across
threads."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from conftest import assert_close
from helpers import randomize_adapters, tiny_llama

import personafuse_kernels as pfk
from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference

TRITON = "triton" in pfk.available_backends()


def _weights(K=8, N=5, E=4, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(E, r, K, generator=g),
            torch.randn(E, N, r, generator=g))


# ---------------------------------------------------------------- top-k checks (item 7)


def test_validated_topk_gates_are_checked_again_for_fewer_experts():
    W, b, A8, B8 = _weights(E=8)
    _, _, A4, B4 = _weights(E=4)
    x = torch.randn(3, 8)
    gates = pfk.TopKGates(torch.tensor([[6, 1], [0, 2], [3, 5]]), torch.rand(3, 2))
    pfk.routed_lora(x, W, b, A8, B8, gates, backend="torch")  # valid for E = 8
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\), or -1 for no adapter; got values from 0 to 6"):
        pfk.routed_lora(x, W, b, A4, B4, gates, backend="torch")


def test_indices_changed_in_place_are_checked_again():
    W, b, A, B = _weights(E=4)
    x = torch.randn(3, 8)
    gates = pfk.TopKGates(torch.tensor([[3, 1], [0, 2], [3, 2]]), torch.rand(3, 2))
    pfk.routed_lora(x, W, b, A, B, gates, backend="torch")
    gates.indices[0, 0] = 9
    with pytest.raises(ValueError, match="indices must be in"):
        pfk.routed_lora(x, W, b, A, B, gates, backend="torch")
    gates.indices = torch.tensor([[1, 1], [0, 2], [3, 2]])  # a new tensor: checked, duplicates found
    with pytest.raises(ValueError, match="repeat an expert"):
        pfk.routed_lora(x, W, b, A, B, gates, backend="torch")


# ---------------------------------------------------------------- duplicates summed everywhere (item 15)


PATHS = [("torch", "dense"), ("torch", "grouped")] + ([("triton", "dense"), ("triton", "grouped")] if TRITON else [])


@pytest.mark.parametrize("backend,path", PATHS)
def test_repeated_experts_in_unvalidated_gates_are_summed_on_every_path(backend, path, monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", path)
    T, K, N, E, r = 7, 33, 20, 4, 3
    W, b, A, B = _weights(K, N, E, r)
    x = torch.randn(T, K, requires_grad=True)
    idx = torch.tensor([[1, 1], [0, 2], [3, 3], [2, 0], [1, 3], [0, 0], [2, 1]])
    w = torch.rand(T, 2, requires_grad=True)
    y = pfk.routed_lora(x, W, b, A, B, pfk.TopKGates(idx, w, validate=False), scaling=1.5, backend=backend)
    dense = torch.zeros(T, E).index_put((torch.arange(T)[:, None].expand(T, 2), idx), w.detach(), accumulate=True)
    ref = routed_lora_reference(x.detach().double(), W.double(), b.double(), A.double(), B.double(),
                                dense.double(), torch.full((E,), 1.5, dtype=torch.float64))
    assert_close(y, ref, 2e-5, "y with repeated experts")
    dy = torch.randn(T, N)
    (dw,) = torch.autograd.grad(y, [w], dy)
    g = dense.double().requires_grad_(True)
    ref_y = routed_lora_reference(x.detach().double(), W.double(), b.double(), A.double(), B.double(), g,
                                  torch.full((E,), 1.5, dtype=torch.float64))
    (dg,) = torch.autograd.grad(ref_y, [g], dy.double())
    assert_close(dw, dg.gather(1, idx), 2e-5, "dweights with repeated experts")


# ---------------------------------------------------------------- shapes nn.Linear accepts (item 12)


def test_no_tokens_per_sequence_gates():
    W, b, A, B = _weights()
    x = torch.randn(2, 0, 8, requires_grad=True)
    g = torch.rand(2, 4, requires_grad=True)
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = pfk.routed_lora(x, W, b, Ar, Br, g)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert torch.equal(g.grad, torch.zeros(2, 4)) and torch.equal(Ar.grad, torch.zeros_like(A))
    assert torch.equal(Br.grad, torch.zeros_like(B))


def test_no_tokens_still_refuses_a_forced_backend_that_cannot_run():
    W, b, A, B = _weights()
    if "cuda" in pfk.available_backends():
        pytest.skip("the cuda backend runs here")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
        pfk.routed_lora(torch.randn(0, 8), W, b, A, B, torch.rand(0, 4), backend="cuda")


def test_k_zero_is_the_bias():
    N, E, r = 5, 3, 2
    b = torch.randn(N)
    y = pfk.routed_lora(torch.randn(4, 0), torch.randn(N, 0), b, torch.randn(E, r, 0), torch.randn(E, N, r),
                        torch.rand(4, E))
    assert torch.equal(y, b.expand(4, N))
    lin = nn.Linear(0, N)
    assert pfk.RoutedLoRALinear(lin, E, r)(torch.randn(2, 3, 0)).shape == (2, 3, N)


def test_meta_tensors_give_shapes():
    meta = {"device": "meta"}
    y = pfk.routed_lora(torch.randn(4, 8, **meta), torch.randn(5, 8, **meta), torch.randn(5, **meta),
                        torch.randn(3, 2, 8, **meta), torch.randn(3, 5, 2, **meta), torch.rand(4, 3, **meta),
                        dropout_p=0.1)
    assert y.shape == (4, 5) and y.device.type == "meta"
    gates = pfk.TopKGates(torch.zeros(4, 2, dtype=torch.int64, **meta), torch.rand(4, 2, **meta))
    assert pfk.routed_lora(torch.randn(4, 8, **meta), torch.randn(5, 8, **meta), None, torch.randn(3, 2, 8, **meta),
                           torch.randn(3, 5, 2, **meta), gates).shape == (4, 5)
    with torch.device("meta"):
        model = tiny_llama()
    pfk.inject_routed_lora(model, ["q_proj", "v_proj"], num_experts=3, rank=2, verbose=False)
    logits = model(torch.zeros(2, 5, dtype=torch.long, device="meta")).logits
    assert logits.shape == (2, 5, 64) and logits.device.type == "meta"


# ---------------------------------------------------------------- merge misuse (item 13)


@pytest.fixture
def merged_model():
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], num_experts=3, rank=2, router="external",
                                   verbose=False)
    randomize_adapters(model)
    pfk.merge(model, torch.tensor([0.2, 0.5, 0.3]))
    return model


def test_merged_layer_refuses_gates_and_persona_gates(merged_model):
    layer = next(pfk.routed_layers(merged_model))
    with pytest.raises(RuntimeError, match="gates= would be ignored"):
        layer(torch.randn(2, layer.in_features), gates=torch.rand(2, 3))
    with pytest.raises(RuntimeError, match="merged with a fixed mix"):
        with pfk.persona_gates(merged_model, torch.rand(3)):
            pass


def test_training_while_merged_warns(merged_model):
    merged_model.train()
    with pytest.warns(UserWarning, match="get no gradient"):
        merged_model(torch.tensor([[1, 2, 3]]))


def test_unmerge_refuses_to_discard_updates_to_the_base_weight(merged_model):
    layer = next(pfk.routed_layers(merged_model))
    with torch.no_grad():
        layer.weight.add_(0.01)  # an optimizer step on an unfrozen W
    trained = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="discard_updates=True"):
        pfk.unmerge(merged_model)
    assert torch.equal(layer.weight, trained) and all(m.merged for m in pfk.routed_layers(merged_model))
    pfk.unmerge(merged_model, discard_updates=True)
    assert not any(m.merged for m in pfk.routed_layers(merged_model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_mix_is_refused(bad):
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj"], num_experts=3, rank=2, router="external", verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="finite mix"):
        pfk.merge(model, torch.tensor([0.5, bad, 0.5]))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    layer = next(pfk.routed_layers(model))
    with pytest.raises(ValueError, match="finite mix"):
        layer.merge(torch.tensor([bad, 0.0, 1.0]))


# ---------------------------------------------------------------- persona_gates across threads (item 8)


def test_second_thread_in_persona_gates_is_refused_not_mixed():
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], num_experts=3, rank=2, router="external",
                                   verbose=False)
    randomize_adapters(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    entered, release, errors, outputs = threading.Event(), threading.Event(), [], {}

    def first():
        with torch.no_grad(), pfk.persona_gates(model, torch.tensor([1.0, 0.0, 0.0])):
            entered.set()
            release.wait(30)
            outputs["first"] = model(ids).logits

    def second():
        entered.wait(30)
        try:
            with pfk.persona_gates(model, torch.tensor([0.0, 0.0, 1.0])):
                outputs["second"] = model(ids).logits
        except RuntimeError as exc:
            errors.append(str(exc))
        try:
            with torch.no_grad():
                model(ids)  # no block of its own: the first thread's mix would be used
        except RuntimeError as exc:
            errors.append(str(exc))
        release.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 2 and "another thread" in errors[0] and "another thread" in errors[1], errors
    assert "second" not in outputs
    with torch.no_grad(), pfk.persona_gates(model, torch.tensor([1.0, 0.0, 0.0])):
        assert torch.equal(outputs["first"], model(ids).logits)  # the first thread got its own mix


def test_nested_persona_gates_in_one_thread_restore_the_outer_mix():
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj"], num_experts=3, rank=2, router="external",
                                   verbose=False)
    randomize_adapters(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    outer, inner = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad(), pfk.persona_gates(model, outer):
        before = model(ids).logits
        with pfk.persona_gates(model, inner):
            assert not torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(RuntimeError, match="set_gates"):
        model(ids)
