"""The serving benchmark: one batch of requests, each with its own persona mix, one persona, or none, over unequal
prompt lengths, through a small Llama whose projections carry E persona adapters. Prefill throughput (tokens/s)
and the ratio to the base model in the same run, for:

    base          the base model alone on the padded batch (the reference time)
    routed        this package: every request's gates in one batch (persona_gates; a request without an adapter
                  is a zero row), one forward
    merge         LoRAX-style weighted merging: for each request, its mix merged into W, the request alone, unmerged
    peft-mixed    peft's mixed-adapter batch (adapter_names=) for the single-persona and no-adapter requests (peft
                  cannot express a mix); routed is timed on the same subset beside it

The adapters are made by peft itself (random, non-zero lora_B) and turned into the routed model's experts with
from_peft, so every method computes the same function: the results are checked against each other before any
time is reported.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
KINDS = ("mix", "single", "none")


@dataclass
class Request:
    length: int
    kind: str  # mix, single or none
    gates: torch.Tensor  # [E]: the mix, a one-hot row, or zeros
    adapter: int  # the persona of a single request, else -1


def make_requests(n: int, E: int, min_len: int, max_len: int, seed: int = 0) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        adapter = -1
        if kind == "mix":
            gates = torch.softmax(torch.randn(E, generator=gen) * 2, -1)
        elif kind == "single":
            adapter = int(torch.randint(0, E, (1,), generator=gen))
            gates = torch.nn.functional.one_hot(torch.tensor(adapter), E).float()
        else:
            gates = torch.zeros(E)
        out.append(Request(length, kind, gates, adapter))
    return out


def build_models(E: int, rank: int, hidden: int, layers: int, vocab: int, device, dtype, seed: int = 0):
    """(base, peft model with adapters p0..p{E-1}, routed model from the same adapters), all in eval mode."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..integration.peft_adapters import from_peft

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(base), lora, adapter_name="p0")
    for e in range(1, E):
        pm.add_adapter(f"p{e}", lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)  # one subfolder per adapter name (the "default" adapter alone goes to the root)
        dirs = [Path(tmp) / f"p{e}" for e in range(E)]
        routed = from_peft(copy.deepcopy(base), [str(d) for d in dirs], router="external", verbose=False)
    return (base.to(device, dtype), pm.to(device, dtype).eval(), routed.to(device, dtype).eval())


def _batch(requests: list[Request], vocab: int, device, seed: int = 1):
    """Right-padded ids [R, S_max], attention mask, and each request's own ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (r.length,), generator=gen) for r in requests]
    S = max(r.length for r in requests)
    padded = torch.zeros(len(requests), S, dtype=torch.long)
    mask = torch.zeros(len(requests), S, dtype=torch.long)
    for i, t in enumerate(ids):
        padded[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return padded.to(device), mask.to(device), [t.to(device) for t in ids]


def _median_ms(fn, device, repeats: int) -> tuple[float, list]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def run_serving(n_requests: int = 12, E: int = 10, rank: int = 16, hidden: int = 128, layers: int = 2,
                vocab: int = 256, min_len: int = 8, max_len: int = 64, device: str = "cpu",
                dtype: torch.dtype = torch.float32, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Rows: method, requests, tokens, ms, tokens_per_s, ratio (ms over the base's ms on the same requests)."""
    import personafuse_kernels as pfk

    dev = torch.device(device)
    base, pm, routed = build_models(E, rank, hidden, layers, vocab, dev, dtype, seed)
    requests = make_requests(n_requests, E, min_len, max_len, seed)
    ids, mask, each = _batch(requests, vocab, dev, seed + 1)
    gates = torch.stack([r.gates for r in requests]).to(dev, torch.float32)
    tokens = int(mask.sum())
    rows = []

    def row(method, subset, ms, base_ms):
        n_tok = sum(requests[i].length for i in subset)
        rows.append({"method": method, "requests": len(subset), "tokens": n_tok, "ms": round(ms, 4),
                     "tokens_per_s": round(n_tok / ms * 1e3, 1), "ratio": round(ms / base_ms, 3)})

    with torch.no_grad():
        base_ms, _ = _median_ms(lambda: base(input_ids=ids, attention_mask=mask).logits, dev, repeats)

        def routed_batch():
            with pfk.persona_gates(routed, gates):
                return routed(input_ids=ids, attention_mask=mask).logits

        routed_ms, routed_logits = _median_ms(routed_batch, dev, repeats)

        def merged_each():
            outs = []
            for r, t in zip(requests, each):
                if r.kind == "none":
                    with pfk.persona_gates(routed, torch.zeros(E, device=dev)):
                        outs.append(routed(input_ids=t[None]).logits[0])
                    continue
                pfk.merge(routed, r.gates.to(dev))
                try:
                    outs.append(routed(input_ids=t[None]).logits[0])
                finally:
                    pfk.unmerge(routed)
            return outs

        merge_ms, merged_logits = _median_ms(merged_each, dev, max(1, repeats // 2))
        for i, (r, want) in enumerate(zip(requests, merged_logits)):  # the same function, before any time counts
            got = routed_logits[i, : r.length]
            if not torch.allclose(got.float(), want.float(), rtol=5e-2, atol=5e-2):
                raise AssertionError(f"request {i} ({r.kind}): the batched routed logits differ from the merged "
                                     f"model's by {(got.float() - want.float()).abs().max():.3g}")

        row("base", range(len(requests)), base_ms, base_ms)
        row("routed", range(len(requests)), routed_ms, base_ms)
        row("merge", range(len(requests)), merge_ms, base_ms)

        subset = [i for i, r in enumerate(requests) if r.kind in ("single", "none")]
        sub_ids, sub_mask, sub_gates = ids[subset], mask[subset], gates[subset]
        names = [f"p{requests[i].adapter}" if requests[i].kind == "single" else "__base__" for i in subset]
        sub_base_ms, _ = _median_ms(lambda: base(input_ids=sub_ids, attention_mask=sub_mask).logits, dev, repeats)
        peft_ms, peft_logits = _median_ms(
            lambda: pm(input_ids=sub_ids, attention_mask=sub_mask, adapter_names=names).logits, dev, repeats)

        def routed_subset():
            with pfk.persona_gates(routed, sub_gates):
                return routed(input_ids=sub_ids, attention_mask=sub_mask).logits

        sub_routed_ms, sub_routed_logits = _median_ms(routed_subset, dev, repeats)
        valid = sub_mask.bool()
        if not torch.allclose(sub_routed_logits[valid].float(), peft_logits[valid].float(), rtol=5e-2, atol=5e-2):
            raise AssertionError("peft's mixed-adapter batch and the routed batch disagree on single-persona requests")
        row("base (single/none)", subset, sub_base_ms, sub_base_ms)
        row("peft-mixed (single/none)", subset, peft_ms, sub_base_ms)
        row("routed (single/none)", subset, sub_routed_ms, sub_base_ms)
    info = {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"), "dtype": str(dtype),
            "batch_requests": n_requests, "batch_tokens": tokens, "E": E, "rank": rank, "hidden": hidden,
            "layers": layers}
    for r in rows:
        r.update(info)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':<28}{'requests':>9}{'tokens':>8}{'ms':>10}{'tokens/s':>11}{'x base':>8}"]
    for r in rows:
        lines.append(f"{r['method']:<28}{r['requests']:>9}{r['tokens']:>8}{r['ms']:>10.2f}{r['tokens_per_s']:>11.0f}"
                     f"{r['ratio']:>8.2f}")
    return "\n".join(lines)


def plot_serving(rows: list[dict], path: Path) -> Path:
    """Tokens/s per method as bars (matplotlib; the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["method"] for r in rows], [r["tokens_per_s"] for r in rows], color="#4477aa")
    ax.set_xlabel("prefill tokens/s (higher is better)")
    ax.set_title(f"serving: {rows[0]['batch_requests']} requests (mix / single / none), {rows[0]['device']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
