"""The `personafuse` command: check, bench, demo.

    personafuse check                 backends here (and why not the others), build facts, a self-test of each
    personafuse bench [--quick]       kernels against the per-expert loop, stacked torch, torch.compile
    personafuse demo                  the PersonaFuse recipe end to end (personafuse_kernels/demo.py)

Bad arguments end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._cliutil import EXIT_USAGE, ArgParser, UsageError, csv_list, writable_folder

# ---------------------------------------------------------------- check


def cmd_check(args) -> int:
    import torch

    from . import __version__
    from .build_info import build_info
    from .dispatch import BACKENDS, available_backends, unavailable_reasons
    from .selftest import self_test, self_test_bf16

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
    if "personafuse_kernels.ops.routed_lora_triton" in sys.modules:  # only when the self-test ran Triton
        from .ops.routed_lora_triton import TMA_FALLBACKS

        for cfg, reason in TMA_FALLBACKS.items():
            tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}, {cfg.num_warps} warps"
            print(f"  triton  note: the TMA dual GEMM ({tile}) failed to compile here and runs the "
                  f"pointer kernel: {reason}")
    print("all available backends pass" if not failed else f"{failed} backend(s) FAILED")
    return 0 if not failed else 1


# ---------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    import torch

    from .bench import kernel_bench as kb
    from .bench.plot import MISSING_MATPLOTLIB, have_matplotlib, plot_rows
    from .bench.providers import PROVIDERS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("personafuse bench: --device cuda but no CUDA GPU is visible")
    prog = "personafuse bench"
    if args.shapes == "serving":
        return _bench_serving(args, device, prog)
    providers = csv_list(args.providers, "--providers", prog) if args.providers is not None else list(PROVIDERS)
    if unknown := [p for p in providers if p not in PROVIDERS]:
        raise UsageError(f"personafuse bench: unknown provider(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PROVIDERS)}")
    modes = csv_list(args.modes, "--modes", prog)
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
    out = writable_folder(args.out, f"{prog}: --out")
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
        if not have_matplotlib():
            print(f"plot: skipped: {MISSING_MATPLOTLIB}")
        else:
            png = plot_rows(rows, out / "bench.png", mode=modes[-1])
            print(f"plot: {png}" if png else "plot: skipped (no rows to draw)")
    print(f"rows: {', '.join(str(p) for p in saved)}")
    return 0


def _bench_serving(args, device: str, prog: str) -> int:
    """`personafuse bench --shapes serving`: the serving benchmark (bench/serving.py), not the op rows."""
    import torch

    from .bench.plot import MISSING_MATPLOTLIB, have_matplotlib
    from .bench.serving import format_rows, plot_serving, run_serving

    out = writable_folder(args.out, f"{prog}: --out")
    small = args.quick or device == "cpu"
    dtype = torch.float32 if device == "cpu" else {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                                   "float32": torch.float32}[args.dtype]
    rows = run_serving(n_requests=12 if small else 96, hidden=128 if small else 2048, layers=2 if small else 4,
                       max_len=64 if small else 512, device=device, dtype=dtype, repeats=3 if small else 10)
    print(format_rows(rows))
    (out / "serving.json").write_text(json.dumps(rows, indent=1))
    if not args.no_plot:
        print(f"plot: {plot_serving(rows, out / 'serving.png')}" if have_matplotlib() else
              f"plot: skipped: {MISSING_MATPLOTLIB}")
    print(f"rows: {out / 'serving.json'}")
    return 0


# ---------------------------------------------------------------- explain


def cmd_explain(args) -> int:
    from .perf import CARDS, calibration, explain

    if args.calibration:
        rows = calibration()
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print("the cost model against the measured H200 rows (ratio to F.linear; required rows must be within 15 %)")
        for r in rows:
            T, K, N, E, rank = r["shape"]
            mark = "ok" if r["within"] else "OFF"
            print(f"  {r['provider']:<8}{r['mode']:<7} T={T:<6} {K}x{N} E={E:<3} measured {r['ratio']:6.2f}x  "
                  f"predicted {r['predicted']:6.2f}x  {r['error']:+6.1%}  {mark}"
                  + ("  (required)" if r["required"] else ""))
        return 0
    if args.against is not None:
        return _explain_against(args)
    if args.shape is None:
        raise UsageError("personafuse explain: --shape T,K,N,E,r[,k] is required (or --calibration, --against)")
    try:
        dims = [int(v) for v in args.shape.split(",")]
    except ValueError:
        raise UsageError(f"personafuse explain: --shape {args.shape!r} must be integers T,K,N,E,r[,k]") from None
    if len(dims) not in (5, 6) or min(dims) < 1:
        raise UsageError(f"personafuse explain: --shape {args.shape!r} must be five or six positive integers")
    if args.card not in CARDS:
        raise UsageError(f"personafuse explain: unknown --card {args.card!r}; choose from {', '.join(CARDS)}")
    T, K, N, E, r, *k = dims
    try:
        result = explain(T, K, N, E, r, k[0] if k else 0, args.dtype, args.backend, args.mode, args.card)
    except ValueError as exc:
        raise UsageError(f"personafuse explain: {exc}") from None
    print(result.to_json() if args.json else result.table())
    return 0


def _explain_against(args) -> int:
    from .perf import against_measured

    try:
        rows = json.loads(Path(args.against).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"personafuse explain: --against {args.against}: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"personafuse explain: --against {args.against}: not a list of bench rows (rows.json)")
    out = against_measured(rows)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    priced = [r for r in out if "skipped" not in r]
    print(f"the cost model against {args.against}: {len(priced)} rows priced, {len(out) - len(priced)} skipped "
          f"(ratio to F.linear; 'GPU' is the prediction with host time hidden)")
    for r in priced:
        top = f" top-{r['top_k']}" if r.get("top_k") else ""
        print(f"  {r['provider']:<8}{r['mode']:<7} T={r['T']:<6} {r['K']}x{r['N']} E={r['E']}{top:<7} "
              f"measured {r['measured']:6.2f}x  predicted {r['predicted']:6.2f}x (GPU {r['predicted_gpu']:5.2f}x)  "
              f"{r['error']:+6.1%}  {'ok' if r['within'] else 'OFF'}" + ("" if r["calibrated"] else "  (uncalibrated)"))
    reasons = sorted({r["skipped"] for r in out if "skipped" in r})
    for why in reasons:
        print(f"  skipped: {why}")
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args, demo_argv) -> int:
    from . import demo

    return demo.main(demo_argv)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = ArgParser(prog="personafuse", description="routed multi-adapter LoRA kernels: check, bench, explain, demo")
    parser.add_argument("--version", action="version", version=f"personafuse-kernels {__version__}")
    sub = parser.add_subparsers(dest="verb", parser_class=ArgParser)
    sub.add_parser("check", help="backends, build facts and a self-test of every available backend")
    b = sub.add_parser("bench", help="benchmark the routed LoRA op (and a training step end to end)")
    b.add_argument("--quick", action="store_true", help="small shapes: a few minutes on a 2-core CPU")
    b.add_argument("--out", default="personafuse-bench", help="folder for rows.csv, rows.json and bench.png")
    b.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all)")
    b.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma-separated: fwd, bwd, fwdbwd")
    b.add_argument("--shapes", default=None,
                   help="preset (quick, issue, decode, prefill, llama8b, topk), 'serving' (a batch of requests "
                        "with mixes, single personas and none, against per-request merging and peft's mixed "
                        "batches), or T,K,N,E,r[,k] tuples separated by ';' (k: top-k gates)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    b.add_argument("--device", default=None, choices=["cpu", "cuda"])
    b.add_argument("--e2e", action="store_true", help="also time a Llama-style training step against the loop")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    x = sub.add_parser("explain", help="the kernels one call launches on a card, their cost, the predicted ratio")
    x.add_argument("--shape", default=None, help="T,K,N,E,r[,k] (k: top-k gates)")
    x.add_argument("--backend", default="triton",
                   choices=["triton", "cuda", "torch", "base", "stacked", "loop", "probe"],
                   help="cuda needs the extension built, not a GPU")
    x.add_argument("--mode", default="fwd", choices=["fwd", "bwd", "fwdbwd"])
    x.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    x.add_argument("--card", default="H200", help="H100-SXM, H200 or A100-SXM-80GB")
    x.add_argument("--json", action="store_true", help="the same as data (schema: docs/cost-model.md)")
    x.add_argument("--calibration", action="store_true", help="the model against the measured H200 rows")
    x.add_argument("--against", default=None, metavar="ROWS_JSON",
                   help="the model against a benchmark run's rows.json (personafuse bench --out)")
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
        return {"check": cmd_check, "bench": cmd_bench, "explain": cmd_explain}[args.verb](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
