"""RoutedLoRALinear and the routers."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_close

import personafuse_kernels as pfk
from personafuse_kernels.routing.routers import router_z_loss, switch_load_balancing_loss


@pytest.mark.parametrize("router", ["token", "sequence", "external"])
def test_fresh_layer_equals_its_linear(router):
    lin = nn.Linear(33, 45)
    layer = pfk.RoutedLoRALinear.from_linear(lin, num_experts=10, rank=16, alpha=32, router=router)
    x = torch.randn(2, 7, 33)
    gates = torch.rand(2, 10) if router == "external" else None
    assert torch.equal(layer(x, gates=gates), lin(x))


def test_peft_init_and_scaling():
    layer = pfk.RoutedLoRALinear.from_linear(nn.Linear(64, 8), num_experts=3, rank=4, alpha=32)
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer.scaling, torch.full((3,), 8.0))
    assert layer.lora_A.shape == (3, 4, 64) and layer.lora_B.shape == (3, 8, 4)


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_gradients_reach_adapters_and_router_not_frozen_base(router):
    lin = nn.Linear(16, 12)
    layer = pfk.RoutedLoRALinear.from_linear(lin, num_experts=4, rank=2, router=router)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(3, 5, 16)).pow(2).mean().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert lin.weight.grad is None and lin.bias.grad is None


def test_unfrozen_base_gets_grads():
    lin = nn.Linear(16, 12)
    layer = pfk.RoutedLoRALinear.from_linear(lin, num_experts=2, rank=2)
    lin.weight.requires_grad_(True)
    lin.bias.requires_grad_(True)
    layer(torch.randn(4, 16)).sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None


def test_layer_matches_functional_with_its_router_gates():
    layer = pfk.RoutedLoRALinear.from_linear(nn.Linear(16, 12), num_experts=3, rank=2, router="token")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    gates = layer.router(x).gates
    expect = pfk.routed_lora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, gates, scaling=layer.scaling)
    assert_close(y, expect, 1e-6)


def test_external_gates_required_and_used():
    layer = pfk.RoutedLoRALinear.from_linear(nn.Linear(16, 12), num_experts=3, rank=2, router="external")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match="set_gates"):
        layer(x)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.7, 0.3]])
    layer.set_gates(mix)
    assert_close(layer(x), layer(x, gates=mix), 0.0)
    with pytest.raises(ValueError, match="E = 3"):
        layer.set_gates(torch.rand(2, 4))


def test_token_router_losses():
    router = pfk.TokenRouter(8, 4, temperature=2.0)
    out = router(torch.randn(3, 5, 8))
    assert out.gates.shape == (3, 5, 4) and out.gates.dtype == torch.float32
    assert_close(out.gates.sum(-1), torch.ones(3, 5), 1e-6)
    # balanced routing gives a load-balancing loss of 1; all-to-one gives E
    uniform = torch.eye(4).repeat(5, 1) * 0.5 + 0.125
    assert abs(float(switch_load_balancing_loss(uniform)) - 1.0) < 1e-6
    onehot = torch.zeros(20, 4)
    onehot[:, 0] = 1
    assert abs(float(switch_load_balancing_loss(onehot)) - 4.0) < 1e-6
    assert float(router_z_loss(torch.zeros(6, 4))) == pytest.approx(math.log(4) ** 2)
    (out.load_balancing_loss + out.z_loss).backward()
    assert router.proj.weight.grad is not None


def test_sequence_router_mask_context_and_hold():
    router = pfk.SequenceRouter(8, 3)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    g = router(x, attention_mask=mask)
    # padding does not change the gates of sequence 0
    x2 = x.clone()
    x2[0, 3:] = 100.0
    assert_close(router(x2, attention_mask=mask), g, 1e-6)
    assert g.shape == (2, 3)
    with pytest.raises(ValueError, match="attention_mask"):
        router(x, attention_mask=mask[:, :4])
    router.hold()
    held = router(x)
    assert torch.equal(router(torch.randn(2, 1, 8)), held)  # a decoding step reuses the prompt's gates
    with pytest.raises(ValueError, match="release"):
        router(torch.randn(3, 1, 8))
    router.release()
    assert not torch.equal(router(torch.randn(2, 1, 8)), held)


def test_hold_sequence_gates_and_routing_inputs_on_a_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pfk.inject_routed_lora(model, ["0", "1"], num_experts=2, rank=2, router="sequence", verbose=False)
    x = torch.randn(2, 4, 8)
    with pfk.hold_sequence_gates(model):
        model(x)
        assert all(m.router._held is not None for m in pfk.routed_layers(model))
    assert all(m.router._held is None for m in pfk.routed_layers(model))
    mask = torch.ones(2, 4)
    with pfk.routing_inputs(model, attention_mask=mask):
        assert all(m._attention_mask is mask for m in pfk.routed_layers(model))
    assert all(m._attention_mask is None for m in pfk.routed_layers(model))


def test_inject_routed_lora_freezes_and_reports(capsys):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pfk.inject_routed_lora(model, ["0", "2"], num_experts=3, rank=2, router="token")
    assert "routed 2 projections" in capsys.readouterr().out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)
    with pytest.raises(ValueError, match="match no module"):
        pfk.inject_routed_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="only nn.Linear, transformers. Conv1D and layers with in_features"):
        pfk.inject_routed_lora(nn.Sequential(nn.ReLU()), ["0"])
    losses = pfk.router_aux_losses(model)
    assert float(losses["load_balancing_loss"]) == 0.0
    model(torch.randn(5, 8))
    assert float(pfk.router_aux_losses(model)["load_balancing_loss"].detach()) > 0.0


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="router"):
        pfk.RoutedLoRALinear.from_linear(nn.Linear(4, 4), router="nope")
    with pytest.raises(ValueError, match="rank"):
        pfk.RoutedLoRALinear.from_linear(nn.Linear(4, 4), rank=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        pfk.RoutedLoRALinear(nn.Conv1d(4, 4, 1), 2, 2)


def test_sequence_router_from_a_context_embedding():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pfk.inject_routed_lora(model, ["0", "1"], num_experts=3, rank=2, router="sequence", context_features=5,
                           verbose=False)
    for m in pfk.routed_layers(model):
        nn.init.normal_(m.lora_B, std=0.5)
    x = torch.randn(2, 4, 8)
    ctx_a, ctx_b = torch.randn(2, 5), torch.randn(2, 5)
    with pfk.routing_inputs(model, context=ctx_a):
        ya = model(x)
        gates = model[0].router(x, context=ctx_a)
    with pfk.routing_inputs(model, context=ctx_b):
        yb = model(x)
    assert not torch.allclose(ya, yb), "the context, not x, decides the mix"
    assert gates.shape == (2, 3) and model[0]._context is None
    ya.sum().backward()
    assert model[0].router.proj.weight.shape == (3, 5) and model[0].router.proj.weight.grad is not None
    with pytest.raises(ValueError, match="router='sequence'"):
        pfk.RoutedLoRALinear.from_linear(nn.Linear(4, 4), num_experts=2, rank=1, router="token").set_context(
            torch.randn(1, 3))
