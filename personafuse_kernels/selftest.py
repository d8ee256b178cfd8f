"""Self-tests of the installed backends, run by `personafuse check`: forward and every gradient of each backend
against the reference on small odd shapes (float32 everywhere; bfloat16 with the 3x rule on GPUs).

rel_err is the one relative-error measure of the package, shared with the tests.
"""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN when out has NaN, so comparisons against a bound fail)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def self_test(backend: str, device: str) -> tuple[bool, float, str]:
    """Forward and every gradient of `backend` against the reference on small odd-shaped inputs, per-token and
    per-sequence gates, with and without dropout. Returns (passed, worst relative error, detail)."""
    from .functional import routed_lora
    from .ops.routed_lora_torch import routed_lora_reference
    from .routing.gates import normalize_gates, token_gates

    worst, detail = 0.0, "ok"
    for gate_mode in ("token", "sequence"):
        for p in (0.0, 0.2):
            gen = torch.Generator().manual_seed(7)
            B, S, K, N, E, r = 2, 7, 33, 45, 3, 4

            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, generator=gen) * scale).to(device)

            leaves = {"x": rnd(B, S, K), "weight": rnd(N, K, scale=K**-0.5), "bias": rnd(N),
                      "lora_A": rnd(E, r, K, scale=K**-0.5), "lora_B": rnd(E, N, r, scale=r**-0.5),
                      "gates": torch.rand(B, E, generator=gen).to(device) if gate_mode == "sequence"
                      else torch.rand(B, S, E, generator=gen).to(device)}
            scaling = torch.tensor([0.5, 1.0, 2.0], device=device)
            dy = rnd(B, S, N)

            def run(name):
                ins = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
                torch.manual_seed(3)  # same dropout seed for every backend
                y = routed_lora(*ins.values(), scaling=scaling, dropout_p=p, backend=name)
                y.backward(dy)
                return [y.detach()] + [ins[k].grad for k in leaves]

            got = run(backend)
            if backend == "torch":  # the oracle itself is checked against the per-expert loop in float64
                torch.manual_seed(3)
                from .ops.dropout import keep_mask, new_seed

                seed = new_seed(torch.device(device))
                ins = {k: v.double().requires_grad_(True) for k, v in leaves.items()}
                keep = keep_mask(seed, B * S, K, p) if p > 0 else None
                norm = normalize_gates(ins["gates"], ins["x"].shape, E)
                y = routed_lora_reference(ins["x"].reshape(-1, K), ins["weight"], ins["bias"], ins["lora_A"],
                                          ins["lora_B"], token_gates(norm.gates, norm.seq_len), scaling.double(),
                                          keep=keep, dropout_p=p).view(B, S, N)
                y.backward(dy.double())
                ref = [y.detach()] + [ins[k].grad for k in leaves]
            else:
                ref = run("torch")
            for name, a, b in zip(["y"] + list(leaves), got, ref):
                err = rel_err(a, b)
                if not err == err or err > 1e-4:  # NaN fails too
                    return False, err, f"{name} ({gate_mode} gates, dropout {p}) off by {err:.2e}"
                worst = max(worst, err)
    return True, worst, detail


def self_test_bf16(backend: str, device: str) -> tuple[bool, float, str]:
    """bfloat16 on a GPU, on the paths the kernel backends take there: T = 14 (decode), T = 133 with dropout and
    per-sequence gates, and top-k gates on the grouped path. Passes when the output and every gradient are within
    3x the error of the torch backend in bfloat16, both measured against torch in float64. Returns (passed, worst
    error ratio, detail)."""
    import os
    from unittest import mock

    from .functional import routed_lora
    from .routing.topk import TopKGates

    worst = 0.0
    cases = [("decode", 2, 7, 0.0, None), ("dropout, per-sequence gates", 1, 133, 0.2, None), ("top-2", 1, 133, 0.0, 2)]
    for label, B, S, p, top_k in cases:
        gen = torch.Generator().manual_seed(11)
        K, N, E, r = 72, 96, 16 if top_k else 10, 16

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen) * scale

        leaves = {"x": rnd(B, S, K), "weight": rnd(N, K, scale=K**-0.5), "bias": rnd(N),
                  "lora_A": rnd(E, r, K, scale=K**-0.5), "lora_B": rnd(E, N, r, scale=r**-0.5)}
        if top_k:
            top = torch.rand(B, S, E, generator=gen).topk(top_k, dim=-1)
            leaves["gates"] = top.values / top.values.sum(-1, keepdim=True)
        else:
            leaves["gates"] = torch.rand(B, E, generator=gen) if label.endswith("per-sequence gates") else \
                torch.rand(B, S, E, generator=gen)
        dy = rnd(B, S, N)

        def run(name, dtype):
            ins = {k: v.to(device, torch.float32 if k == "gates" else dtype).requires_grad_(True)
                   for k, v in leaves.items()}
            gates = TopKGates(top.indices.to(device), ins["gates"]) if top_k else ins["gates"]
            torch.manual_seed(3)
            y = routed_lora(ins["x"], ins["weight"], ins["bias"], ins["lora_A"], ins["lora_B"], gates, scaling=2.0,
                            dropout_p=p, backend=name)
            y.backward(dy.to(device, dtype))
            return [y.detach()] + [ins[k].grad for k in leaves]

        with mock.patch.dict(os.environ, {"PERSONAFUSE_TOPK_PATH": "grouped"}):
            got, same, ref = run(backend, torch.bfloat16), run("torch", torch.bfloat16), run("torch", torch.float64)
        for name, a, b, c in zip(["y"] + [f"d{k}" for k in leaves], got, same, ref):
            err_a, err_b = rel_err(a, c), rel_err(b, c)
            ratio = err_a / (err_b + 1e-4)
            if not ratio == ratio or ratio > 3:
                return False, ratio, f"{name} ({label}) error {err_a:.2e}, torch bfloat16 {err_b:.2e}"
            worst = max(worst, ratio)
    return True, worst, "ok"
