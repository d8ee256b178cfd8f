"""Decode in real use is host-bound (explain: three launches of host time against microseconds of GPU work), so the
decode path must be CUDA-graph capturable: no host sync, no allocation the graph cannot replay, no Python-side
state that changes between replays. These tests capture a decode step of routed layers and replay it with new
inputs (GPU only; they skip without one). The host-side half of the argument runs everywhere: test_host_budget.py
proves every path free of host syncs on meta tensors."""
import pytest
import torch
from conftest import requires_cuda

import personafuse_kernels as pfk

pytestmark = requires_cuda


def _capture(fn, static_inputs):
    """Warm up on a side stream (as torch.cuda.graphs asks), capture, and return (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("T", [1, 16, 64])
def test_routed_op_decode_step_replays(backend, T):
    if backend not in pfk.available_backends():
        pytest.skip(f"{backend} backend unavailable here")
    g = dict(device="cuda", dtype=torch.bfloat16)
    K, N, E, r = 1024, 1024, 10, 16
    W, b = torch.randn(N, K, **g) / K**0.5, torch.randn(N, **g)
    A, B = torch.randn(E, r, K, **g) / K**0.5, torch.randn(E, N, r, **g) / r**0.5
    x = torch.randn(T, K, **g)
    gates = torch.softmax(torch.randn(T, E, device="cuda"), -1)

    def step(x, gates):
        return pfk.routed_lora(x, W, b, A, B, gates, scaling=2.0, backend=backend)

    graph, out = _capture(step, (x, gates))
    for _ in range(3):  # new tokens and new mixes, copied into the captured inputs
        x.copy_(torch.randn(T, K, **g))
        gates.copy_(torch.softmax(torch.randn(T, E, device="cuda"), -1))
        graph.replay()
        torch.testing.assert_close(out, step(x, gates), rtol=2e-2, atol=2e-2)


def test_llama_decode_step_with_persona_gates_replays():
    """Routed layers inside a captured decode step of a small Llama (static KV cache), with external gates held by
    persona_gates: replaying the captured step over a token sequence gives the eager step's logits."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_llama

    model = tiny_llama(layers=2, hidden=256).to("cuda", torch.bfloat16).eval()
    model = pfk.inject_routed_lora(model, ["q_proj", "v_proj", "o_proj"], num_experts=10, rank=16,
                                   router="external")
    batch, max_len, steps = 2, 32, 4
    cache = transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                                     device="cuda", dtype=torch.bfloat16)
    mix = torch.softmax(torch.randn(batch, 10, device="cuda"), -1)
    tokens = torch.randint(0, model.config.vocab_size, (steps, batch, 1), device="cuda")

    def step(ids, pos):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

    with torch.no_grad(), pfk.persona_gates(model, mix):
        eager = [step(tokens[t], torch.tensor([t], device="cuda")).clone() for t in range(steps)]
        cache.reset()
        ids, pos = tokens[0].clone(), torch.tensor([0], device="cuda")
        graph, out = _capture(step, (ids, pos))
        cache.reset()
        for t in range(steps):
            ids.copy_(tokens[t])
            pos.fill_(t)
            graph.replay()
            torch.testing.assert_close(out, eager[t], rtol=3e-2, atol=3e-2)
