"""peft adapters as experts: one-hot gates reproduce peft's own output; one expert exports back to peft."""
import copy

import pytest
import torch
from conftest import assert_close
from helpers import tiny_llama

import personafuse_kernels as pfk

peft = pytest.importorskip("peft")
IDS = torch.tensor([[5, 9, 3, 7, 1, 22, 8], [4, 4, 17, 30, 2, 11, 6]])
ADAPTERS = [  # r, lora_alpha, target_modules, use_rslora: ranks, scalings and targets differ per adapter
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
    dict(r=8, lora_alpha=4, target_modules=["v_proj", "o_proj", "up_proj"], use_rslora=True),
]


def make_peft_adapters(root, base):
    """Adapters created and saved by peft itself, with non-zero lora_B."""
    dirs = []
    for i, kw in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_dropout=0.0, **kw))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3)
        d = root / f"adapter{i}"
        pm.save_pretrained(str(d))
        dirs.append(d)
    return dirs


def peft_logits(base, folder):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return pm(IDS).logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_llama()
    dirs = make_peft_adapters(tmp_path_factory.mktemp("peft"), base)
    return base, dirs


def test_one_hot_gates_reproduce_each_peft_adapter(setup):
    base, dirs = setup
    model = pfk.from_peft(copy.deepcopy(base), dirs, router="external", verbose=False)
    layers = dict(pfk.named_routed_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].rank == 4  # max of the ranks that target q_proj
    assert layers["model.layers.0.self_attn.v_proj"].expert_ranks == [4, 0, 8]
    with torch.no_grad():
        base_logits = base(IDS).logits
        for i, d in enumerate(dirs):
            expected = peft_logits(base, d)
            assert not torch.allclose(expected, base_logits, atol=1e-3), "the adapter must change the output"
            with pfk.persona_gates(model, torch.nn.functional.one_hot(torch.tensor(i), len(dirs)).float()):
                assert_close(model(IDS).logits, expected, 1e-5, f"adapter {i}")


def test_export_expert_loads_in_peft(setup, tmp_path):
    base, dirs = setup
    model = pfk.from_peft(copy.deepcopy(base), dirs, router="external", verbose=False)
    mix = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad(), pfk.persona_gates(model, mix):
        routed = model(IDS).logits
    out = pfk.export_peft(model, 1, tmp_path / "exported")
    assert_close(peft_logits(base, out), routed, 1e-5, "exported expert 1")
    # a routed model made by inject (trained from scratch) exports too
    fresh = pfk.inject_routed_lora(copy.deepcopy(base), ["q_proj", "up_proj"], num_experts=2, rank=3, alpha=6,
                                   router="external", verbose=False)
    with torch.no_grad():
        for m in pfk.routed_layers(fresh):
            m.lora_B.normal_(std=0.3)
    with torch.no_grad(), pfk.persona_gates(fresh, torch.tensor([1.0, 0.0])):
        fresh_logits = fresh(IDS).logits
    assert_close(peft_logits(base, pfk.export_peft(fresh, 0, tmp_path / "fresh")), fresh_logits, 1e-5)


def test_from_peft_errors_leave_model_unchanged(setup, tmp_path):
    base, dirs = setup
    model = copy.deepcopy(base)
    with pytest.raises(FileNotFoundError, match="not a peft adapter folder"):
        pfk.from_peft(model, [dirs[0], tmp_path / "missing"])
    other = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match="in the adapter but"):
        pfk.from_peft(other, dirs)
    assert not list(pfk.routed_layers(other))
    with pytest.raises(ValueError, match="expert must be"):
        pfk.export_peft(pfk.from_peft(model, dirs, verbose=False), 5, tmp_path / "x")
