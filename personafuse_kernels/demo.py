"""PersonaFuse, end to end: ten Big Five persona experts in every projection of a small Llama, a persona router,
training on the persona dialogue set that ships with the package, then what the model learned.

    personafuse demo                                   # defaults: a 2-core CPU finishes in a few minutes
    python python/persona_demo.py                      # the same, from a checkout
    personafuse demo --mix "E+=0.7,A+=0.3" --prompt "the party tonight will be huge"
    personafuse demo --model /path/to/local/llama      # real local weights and tokenizer (no downloads)

Steps: (1) build the model (an embedded Llama config, or --model) and put E = 10 routed LoRA experts (O+, O-,
C+, C-, E+, E-, A+, A-, N+, N-) into q, k, v, o, gate, up and down; (2) train the experts on replies in their
persona's style (each example's own persona as one-hot gates) and a sequence router that reads the situation
(its pooled prompt embedding) to predict the persona; (3) print the router's gates for prompts it never saw;
(4) save adapters and router, reload them into a fresh model and check the outputs are identical; (5) generate
with a persona mix you choose; (6) compare training tokens/s with the per-expert loop.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._cliutil import ArgParser, UsageError, writable_folder
from .bench.providers import per_expert_loop
from .dispatch import resolve_backend
from .integration import inject_routed_lora, load_adapters, persona_gates, routed_layers, save_adapters
from .routing import SequenceRouter

PERSONAS = ["O+", "O-", "C+", "C-", "E+", "E-", "A+", "A-", "N+", "N-"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_dialogues() -> dict:
    text = resources.files("personafuse_kernels").joinpath("data/persona_dialogues.json").read_text()
    data = json.loads(text)
    assert [p["name"] for p in data["personas"]] == PERSONAS
    return data


class WordTokenizer:
    """Lower-case words and punctuation from the dialogue set; ids 0..4 are pad, bos, eos, sep, unk."""

    SPECIAL = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]

    def __init__(self, texts):
        words = sorted({w for t in texts for w in self.split(t)})
        self.itos = self.SPECIAL + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.unk_id = range(5)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in ids if i >= len(self.SPECIAL))

    def __len__(self):
        return len(self.itos)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the same small interface (for --model)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.sep_id = (tok.encode("\n", add_special_tokens=False) or [self.eos_id])[-1]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def __len__(self):
        return len(self.tok)


def build_model(args, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        torch.manual_seed(args.seed)  # the same seed builds the same base: what reloading relies on
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    model = model.to(args.device)
    inject_routed_lora(model, PROJECTIONS, num_experts=len(PERSONAS), rank=args.rank, alpha=2 * args.rank,
                           dropout=args.dropout, router="external", verbose=args.verbose)
    return model


class PersonaRouter(nn.Module):
    """PersonaFuse's situation-aware router: a SequenceRouter reading the situation as a context embedding,
    the frozen input embeddings of the prompt's words pooled over the situation and normalized to unit RMS
    (raw embeddings are tiny at init, which would make the router learn slowly). Returns gates [B, E]."""

    def __init__(self, embeddings: nn.Embedding, num_experts: int, temperature: float = 1.0):
        super().__init__()
        self.embeddings = embeddings  # shared with the model, frozen
        dim = embeddings.embedding_dim
        self.router = SequenceRouter(dim, num_experts, temperature, device=embeddings.weight.device)

    def forward(self, ids, prompt_mask):
        x = self.embeddings(ids).float()
        pooled = self.router.pool(x, prompt_mask)  # [B, dim], valid (situation) tokens only
        context = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        return self.router(x, context=context)


def encode_example(tok, situation: str, reply: str | None):
    prompt = [tok.bos_id] + tok.encode(situation) + [tok.sep_id]
    answer = [] if reply is None else tok.encode(reply) + [tok.eos_id]
    return prompt, answer


def collate(tok, examples, device):
    """ids [B, L] (right-padded), labels [B, L] (-100 except reply tokens), prompt mask, attention mask."""
    seqs = [(p, a) for p, a in examples]
    L = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    prompt_mask = torch.zeros_like(ids)
    attn = torch.zeros_like(ids)
    for i, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a) if a else labels[i, len(p):n]
        prompt_mask[i, 1 : len(p) - 1] = 1  # the situation's words
        attn[i, :n] = 1
    return ids.to(device), labels.to(device), prompt_mask.to(device), attn.to(device)


def training_pairs(data):
    return [(e, s, r) for e, p in enumerate(data["personas"]) for s in p["situations"] for r in p["replies"]]


def train(model, router, tok, pairs, args):
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad] + list(router.router.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    rng = random.Random(args.seed)
    model.train()
    history = []
    bar = tqdm(range(1, args.steps + 1), desc="training", file=sys.stderr, disable=not args.progress)
    for step in bar:
        batch = rng.sample(pairs, min(args.batch, len(pairs)))
        ids, labels, pmask, attn = collate(tok, [encode_example(tok, s, r) for _, s, r in batch], args.device)
        persona = torch.tensor([e for e, _, _ in batch], device=args.device)
        # experts learn their own persona's style: each example's gates are its persona, one-hot
        with persona_gates(model, F.one_hot(persona, len(PERSONAS)).float()):
            lm = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        # the router learns to read the persona a situation calls for
        route = F.nll_loss(torch.log(router(ids, pmask) + 1e-9), persona)
        loss = lm + route
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((lm.item(), route.item()))
        bar.set_postfix(lm=f"{lm.item():.3f}", router=f"{route.item():.3f}")
    model.eval()
    return history


@torch.no_grad()
def route(router, tok, situations, device):
    ids, _, pmask, _ = collate(tok, [encode_example(tok, s, None) for s in situations], device)
    return router(ids, pmask)


@torch.no_grad()
def generate(model, tok, situation: str, gates, device, max_new_tokens: int = 24) -> str:
    prompt, _ = encode_example(tok, situation, None)
    ids = torch.tensor([prompt], device=device)
    with persona_gates(model, gates.to(device)):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return tok.decode(out[0, len(prompt):].tolist())


def parse_mix(text: str) -> torch.Tensor:
    gates = torch.zeros(len(PERSONAS))
    seen = set()
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in PERSONAS:
            raise UsageError(f"personafuse demo: unknown persona {name!r} in --mix; choose from {', '.join(PERSONAS)}")
        if name in seen:
            raise UsageError(f"personafuse demo: persona {name} appears twice in --mix {text!r}")
        seen.add(name)
        try:
            value = float(weight or 1.0)
        except ValueError:
            raise UsageError(f"personafuse demo: --mix weight {weight!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"personafuse demo: --mix weight of {name} is {value}; weights must be finite")
        gates[PERSONAS.index(name)] = value
    if gates.sum() <= 0 or (gates < 0).any():
        raise UsageError("personafuse demo: --mix weights must be >= 0 and not all zero")
    return gates / gates.sum()


def throughput(model, tok, pairs, args, loop: bool) -> float:
    """Training tokens/s (forward + backward) over a few steps, after one warm-up step."""
    batch = pairs[: args.batch]
    ids, labels, _, attn = collate(tok, [encode_example(tok, s, r) for _, s, r in batch], args.device)
    gates = F.one_hot(torch.tensor([e for e, _, _ in batch]), len(PERSONAS)).float()

    def step():
        with persona_gates(model, gates):
            model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()

    def timed():
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.timing_steps):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return ids.numel() * args.timing_steps / (time.perf_counter() - t0)

    model.train()
    try:
        if loop:
            with per_expert_loop(model):
                return timed()
        return timed()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def build_parser():
    ap = ArgParser(prog="personafuse demo", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a local Hugging Face causal LM folder (weights and tokenizer)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--mix", default="E+=0.7,A+=0.3", help="persona mix for the generation, e.g. 'E+=0.7,A+=0.3'")
    ap.add_argument("--prompt", default="my friend invites everyone to a party after her hard week")
    ap.add_argument("--out", default=None, help="folder for the saved adapters (default: a temporary folder)")
    ap.add_argument("--timing-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--quiet", dest="verbose", action="store_false")
    return ap


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def check_args(args) -> None:
    """Every argument checked before any work: one line and exit 2 for a bad one, not a traceback after
    training."""
    prog = "personafuse demo"
    if args.model:
        folder = Path(args.model)
        if not folder.is_dir():
            raise UsageError(f"{prog}: --model {args.model} is not a folder")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{prog}: --model {args.model} holds no config.json: not a Hugging Face model folder")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{prog}: --device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{prog}: --device cuda but no CUDA GPU is visible")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{prog}: --device {args.device!r}: the demo runs on cpu or cuda")
    for flag in ("steps", "batch", "rank", "layers", "timing_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"{prog}: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.hidden < 8 or args.hidden % 4:
        raise UsageError(f"{prog}: --hidden must be a multiple of 4 (the attention heads) and >= 8, got {args.hidden}")
    if not (math.isfinite(args.dropout) and 0.0 <= args.dropout < 1.0):
        raise UsageError(f"{prog}: --dropout must be in [0, 1), got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"{prog}: --lr must be a finite number > 0, got {args.lr}")
    if args.out:
        writable_folder(args.out, f"{prog}: --out")


def run(args) -> int:
    check_args(args)
    mix = parse_mix(args.mix)
    if args.out:
        return demo(args, mix, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="personafuse-demo-") as tmp:  # removed at the end, whatever happens
        return demo(args, mix, Path(tmp))


def demo(args, mix: torch.Tensor, out: Path) -> int:
    """Steps 1 to 6 (module docstring), with the checkpoint written under `out`."""
    data = load_dialogues()
    pairs = training_pairs(data)
    if args.model:
        from transformers import AutoTokenizer

        tok = HFTokenizer(AutoTokenizer.from_pretrained(args.model, local_files_only=True))
    else:
        texts = [s for p in data["personas"] for s in p["situations"] + p["replies"] + p["unseen"]]
        tok = WordTokenizer(texts)
    torch.manual_seed(args.seed)
    model = build_model(args, len(tok))
    router = PersonaRouter(model.get_input_embeddings(), len(PERSONAS)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1/6] model: {n_params / 1e6:.2f}M parameters, {len(PERSONAS)} persona experts ({' '.join(PERSONAS)}) "
          f"of rank {args.rank} in {len(list(routed_layers(model)))} projections; backend "
          f"{resolve_backend('auto', torch.device(args.device), next(model.parameters()).dtype)}")

    print(f"[2/6] training on {len(pairs)} persona dialogue pairs for {args.steps} steps of {args.batch}")
    t0 = time.perf_counter()
    history = train(model, router, tok, pairs, args)
    first, last = history[0], history[-1]
    print(f"      lm loss {first[0]:.3f} -> {last[0]:.3f}, router loss {first[1]:.3f} -> {last[1]:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")

    print("[3/6] router gates for prompts it never saw (top 3 personas):")
    unseen = [(e, s) for e, p in enumerate(data["personas"]) for s in p["unseen"]]
    gates = route(router, tok, [s for _, s in unseen], args.device)
    hits = 0
    for (e, s), g in zip(unseen, gates):
        top = g.topk(3)
        hits += int(top.indices[0]) == e
        picks = ", ".join(f"{PERSONAS[i]} {float(v):.2f}" for v, i in zip(top.values, top.indices))
        mark = "ok " if int(top.indices[0]) == e else "MISS"
        print(f"      {mark} want {PERSONAS[e]:<3} | {picks:<28} | {s}")
    print(f"      the router picks the intended persona for {hits} of {len(unseen)} unseen prompts")

    save_adapters(model, out / "adapters")
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in router.router.state_dict().items()}, str(out / "router.safetensors"))
    fresh = build_model(argparse.Namespace(**{**vars(args), "verbose": False}), len(tok))
    load_adapters(fresh, out / "adapters")
    fresh_router = PersonaRouter(fresh.get_input_embeddings(), len(PERSONAS)).to(args.device)
    fresh_router.router.load_state_dict(load_file(str(out / "router.safetensors"), device=args.device))
    fresh.eval()
    probe = [s for _, s in unseen]
    ids, _, pmask, attn = collate(tok, [encode_example(tok, s, None) for s in probe], args.device)
    with torch.no_grad():
        g_old, g_new = router(ids, pmask), fresh_router(ids, pmask)
        with persona_gates(model, g_old):
            y_old = model(input_ids=ids, attention_mask=attn).logits
        with persona_gates(fresh, g_new):
            y_new = fresh(input_ids=ids, attention_mask=attn).logits
    same = torch.equal(g_old, g_new) and torch.equal(y_old, y_new)
    where = out if args.out else "a temporary folder (removed at exit; --out keeps it)"
    print(f"[4/6] saved adapters and router to {where}; reloaded into a fresh model: outputs "
          f"{'identical' if same else 'DIFFERENT'}")

    names = ", ".join(f"{PERSONAS[i]} {float(mix[i]):.2f}" for i in mix.nonzero().flatten())
    routed_mix = route(router, tok, [args.prompt], args.device)[0]
    print(f"[5/6] generation for: {args.prompt!r}")
    print(f"      mix {names:<22}-> {generate(model, tok, args.prompt, mix, args.device)}")
    top = int(routed_mix.argmax())
    print(f"      router's mix (top {PERSONAS[top]} {float(routed_mix[top]):.2f})  -> "
          f"{generate(model, tok, args.prompt, routed_mix.cpu(), args.device)}")
    for name in ("N+", "N-"):
        one = F.one_hot(torch.tensor(PERSONAS.index(name)), len(PERSONAS)).float()
        print(f"      {name} alone{'':<17}-> {generate(model, tok, args.prompt, one, args.device)}")

    fused = throughput(model, tok, pairs, args, loop=False)
    loop = throughput(model, tok, pairs, args, loop=True)
    print(f"[6/6] training throughput on {args.device}: personafuse {fused:,.0f} tokens/s, per-expert loop "
          f"{loop:,.0f} tokens/s ({fused / loop:.2f}x)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
