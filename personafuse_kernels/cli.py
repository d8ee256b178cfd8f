"""The `personafuse` command: check, bench, demo.

    personafuse check                 backends here (and why not the others), build facts, a self-test of each
    personafuse bench [--quick]       kernels against the per-expert loop, stacked torch, torch.compile
    personafuse demo                  the PersonaFuse recipe end to end (python/persona_demo.py)

Bad arguments end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or missing input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block; one line is enough
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------- check


def self_test(backend: str, device: str) -> tuple[bool, float, str]:
    """Forward and every gradient of `backend` against the reference on small odd-shaped inputs, per-token and
    per-sequence gates, with and without dropout. Returns (passed, worst relative error, detail)."""
    import torch

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
                err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
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

    import torch

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
            def err(t):
                return float((t.double() - c.double()).norm() / c.double().norm().clamp_min(1e-30))

            ratio = err(a) / (err(b) + 1e-4)
            if not ratio == ratio or ratio > 3:
                return False, ratio, f"{name} ({label}) error {err(a):.2e}, torch bfloat16 {err(b):.2e}"
            worst = max(worst, ratio)
    return True, worst, "ok"


def cmd_check(args) -> int:
    import torch

    from . import __version__
    from .build_info import build_info
    from .dispatch import BACKENDS, available_backends, unavailable_reasons

    info = build_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"personafuse-kernels {__version__}")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {sys.version.split()[0]}, "
          f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (no CUDA GPU visible)'}")
    built = "yes" if info.get("extension_built") else f"no ({info.get('skip_reason')})"
    print(f"  CUDA extension built: {built}" + (f", archs {info.get('cuda_arch_list')}, built with torch "
                                                 f"{info.get('torch_version')}" if info.get("extension_built") else ""))
    avail, reasons = available_backends(), unavailable_reasons()
    print("backends:")
    for name in BACKENDS:
        print(f"  {name:<8}" + ("available" if name in avail else f"unavailable: {reasons.get(name)}"))
    print(f"self-test on {device} (forward and every gradient against the reference; per-token and per-sequence "
          f"gates; dropout):")
    failed = 0
    for name in avail:
        if device not in BACKENDS[name].devices:
            print(f"  {name:<8}skipped: runs on {', '.join(BACKENDS[name].devices)} tensors, this machine has {device}")
            continue
        try:
            ok, err, detail = self_test(name, device)
        except Exception as exc:
            ok, err, detail = False, float("nan"), f"{type(exc).__name__}: {exc}"
        failed += not ok
        print(f"  {name:<8}{'PASS' if ok else 'FAIL'}  worst relative error {err:.1e}" + ("" if ok else f"  {detail}"))
        if device == "cuda" and name != "torch":
            try:
                ok, ratio, detail = self_test_bf16(name, device)
            except Exception as exc:
                ok, ratio, detail = False, float("nan"), f"{type(exc).__name__}: {exc}"
            failed += not ok
            print(f"  {name:<8}{'PASS' if ok else 'FAIL'}  bfloat16 (decode, dropout, top-2 grouped): worst error "
                  f"{ratio:.2f}x torch's bfloat16 error" + ("" if ok else f"  {detail}"))
    print("all available backends pass" if not failed else f"{failed} backend(s) FAILED")
    return 0 if not failed else 1


# ---------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    import torch

    from .bench import kernel_bench as kb
    from .bench.plot import plot_rows
    from .bench.providers import PROVIDERS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("personafuse bench: --device cuda but no CUDA GPU is visible")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else list(PROVIDERS)
    if unknown := [p for p in providers if p not in PROVIDERS]:
        raise UsageError(f"personafuse bench: unknown provider(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PROVIDERS)}")
    modes = [m.strip() for m in args.modes.split(",")]
    if bad := [m for m in modes if m not in kb.MODES]:
        raise UsageError(f"personafuse bench: unknown mode(s) {', '.join(bad)}; choose from {', '.join(kb.MODES)}")
    try:
        if args.shapes and any(c.isdigit() for c in args.shapes[:1]):
            shapes = kb.parse_shapes(args.shapes)
        else:
            shapes = kb.preset_shapes(args.shapes or ("quick" if args.quick or device == "cpu" else "llama8b"))
    except ValueError as exc:
        raise UsageError(f"personafuse bench: {exc}") from None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        print(f"note: CPU runs in float32 (not {args.dtype})")
        dtype = torch.float32
    out = Path(args.out)
    rows = kb.run(shapes, modes, providers, device, dtype, show_progress=not args.no_progress)
    saved = kb.save_rows(rows, out)
    facts = rows[0] if rows else {}
    print(f"\n{facts.get('device')} | torch {facts.get('torch')} | triton {facts.get('triton')} | commit "
          f"{facts.get('commit')} | {str(dtype).replace('torch.', '')}")
    print("base in ms; every other provider as its ratio to base (its time over base's), measured in the same run")
    print(kb.format_table(rows))
    if args.e2e:
        from .bench.e2e import format_e2e, run_e2e

        steps = 2 if args.quick or device == "cpu" else 10
        batch, seq = (2, 64) if device == "cpu" else (4, 2048)
        e2e_rows = run_e2e(device, dtype, batch, seq, steps)
        saved += kb.save_rows(e2e_rows, out, "e2e")
        print(format_e2e(e2e_rows))
    if not args.no_plot:
        png = plot_rows(rows, out / "bench.png", mode=modes[-1])
        print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed or no rows to draw)")
    print(f"rows: {', '.join(str(p) for p in saved)}")
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args, demo_argv) -> int:
    try:
        from personafuse_recipes import persona_demo
    except ImportError:
        root = Path(__file__).resolve().parents[1] / "python"
        if not (root / "persona_demo.py").exists():
            raise UsageError("personafuse demo: the recipes (python/persona_demo.py) are not installed") from None
        sys.path.insert(0, str(root.parent))
        from python import persona_demo  # a source checkout without an install
    return persona_demo.main(demo_argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="personafuse", description="routed multi-adapter LoRA kernels: check, bench, demo")
    sub = parser.add_subparsers(dest="verb", parser_class=_Parser)
    sub.add_parser("check", help="backends, build facts and a self-test of every available backend")
    b = sub.add_parser("bench", help="benchmark the routed LoRA op (and a training step end to end)")
    b.add_argument("--quick", action="store_true", help="small shapes: a few minutes on a 2-core CPU")
    b.add_argument("--out", default="personafuse-bench", help="folder for rows.csv, rows.json and bench.png")
    b.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all)")
    b.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma-separated: fwd, bwd, fwdbwd")
    b.add_argument("--shapes", default=None,
                   help="preset (quick, issue, decode, prefill, llama8b, topk) or T,K,N,E,r[,k] tuples separated "
                        "by ';' (k: top-k gates)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    b.add_argument("--device", default=None, choices=["cpu", "cuda"])
    b.add_argument("--e2e", action="store_true", help="also time a Llama-style training step against the loop")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    sub.add_parser("demo", help="the PersonaFuse recipe end to end (options: personafuse demo --help)",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["demo"]:
            return cmd_demo(None, argv[1:])
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return EXIT_USAGE
        return {"check": cmd_check, "bench": cmd_bench}[args.verb](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
