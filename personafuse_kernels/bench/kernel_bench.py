"""Op-level benchmark: every provider x mode x shape, as ratios to the base F.linear measured in the same run.

Modes: fwd, bwd (backward alone, from a kept graph), fwdbwd (W frozen: grads of x, lora_A, lora_B, gates;
the base provider computes dx only). Metrics: median ms with its quartiles (GPU: triton.testing.do_bench, L2
flushed before each repetition; CPU: torch.utils.benchmark's adaptive repetition), rows whose interquartile range
is over 10% of the median flagged as noisy, ratio to base, TFLOP/s from the cost model, peak MiB allocated above
the inputs (GPU). Inputs x and gates rotate among ROTATIONS sets between calls.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..routing.topk import TopKGates
from .providers import OUR_BACKENDS, PROVIDERS, make_provider, unavailable

MODES = ("fwd", "bwd", "fwdbwd")
ROTATIONS = 3
E_PF, R_PF = 10, 16  # PersonaFuse: ten Big Five experts, rank 16
# Llama-3.1-8B projections (hidden 4096, intermediate 14336, 8 KV heads of 128): K, N
LLAMA8B_PROJECTIONS = {"q/o_proj": (4096, 4096), "k/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336),
                       "down_proj": (14336, 4096)}
DECODE_T = (1, 16, 64)
PREFILL_T = (4096, 16384)


@dataclass(frozen=True)
class Shape:
    T: int
    K: int
    N: int
    E: int
    r: int
    name: str = ""
    top_k: int = 0  # 0: dense gates; k: TopKGates for our backends, the same gates densified for the others

    def label(self) -> str:
        top = f" top-{self.top_k}" if self.top_k else ""
        return f"{self.name + ' ' if self.name else ''}T={self.T} {self.K}x{self.N} E={self.E} r={self.r}{top}"

    def active(self) -> int:
        """Experts each token really uses (the useful LoRA work)."""
        return self.top_k or self.E


def preset_shapes(preset: str) -> list[Shape]:
    """'decode' / 'prefill' / 'llama8b' (both) on the Llama-3.1-8B projections, 'issue' (the target table),
    'topk' (T = 8192, 4096x4096, r = 16, top-2, E = 8..128), 'quick' (small CPU shapes)."""
    if preset == "topk":
        return [Shape(8192, 4096, 4096, E, 16, "q/o_proj", top_k=2) for E in (8, 16, 32, 64, 128)]
    if preset == "quick":
        return [Shape(1, 256, 256, E_PF, R_PF, "tiny"), Shape(128, 256, 512, E_PF, R_PF, "tiny")]
    if preset == "issue":
        return [Shape(T, 4096, 4096, E_PF, R_PF, "q/o_proj") for T in (1, 16, 64, 4096, 16384)] + [
            Shape(8192, 4096, 14336, E_PF, R_PF, "gate/up_proj"), Shape(8192, 14336, 4096, E_PF, R_PF, "down_proj")]
    ts = {"decode": DECODE_T, "prefill": PREFILL_T, "llama8b": DECODE_T + PREFILL_T}.get(preset)
    if ts is None:
        raise ValueError(f"unknown shape preset {preset!r}; choose from quick, issue, decode, prefill, llama8b, topk")
    return [Shape(T, K, N, E_PF, R_PF, name) for T in ts for name, (K, N) in LLAMA8B_PROJECTIONS.items()]


def parse_shapes(text: str) -> list[Shape]:
    """'T,K,N,E,r;T,K,N,E,r,k' -> shapes (an optional sixth value k asks for top-k gates)."""
    shapes = []
    for part in text.split(";"):
        values = [int(v) for v in part.split(",")]
        if len(values) not in (5, 6) or min(values) < 1 or (len(values) == 6 and values[5] > values[3]):
            raise ValueError(f"a shape is T,K,N,E,r or T,K,N,E,r,k (all >= 1, k <= E), got {part!r}")
        T, K, N, E, r = values[:5]
        shapes.append(Shape(T, K, N, E, r, top_k=values[5] if len(values) == 6 else 0))
    return shapes


def flops(mode: str, s: Shape, provider: str) -> float:
    base = {"fwd": 2, "bwd": 2, "fwdbwd": 4}[mode] * s.T * s.K * s.N
    if provider == "base":
        return base
    return base + {"fwd": 2, "bwd": 4, "fwdbwd": 6}[mode] * s.T * s.active() * s.r * (s.K + s.N)


CPU_MAX_RUN_S = 2.0  # adaptive CPU timing stops here even when the spread has not settled
NOISY_SPREAD = 0.10  # a row whose IQR is over 10% of its median is flagged in the table


@dataclass(frozen=True)
class Timing:
    """Quartiles of one provider's time per call (ms) and how many calls were timed."""
    median_ms: float
    q25_ms: float
    q75_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        return (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else 0.0


def time_call(fn, device: str, grad_to_none=None) -> Timing:
    """GPU: triton.testing.do_bench (L2 flushed before each repetition), its quartiles. CPU:
    torch.utils.benchmark's adaptive repetition (blocks of calls until the IQR settles under 10% of the median or
    CPU_MAX_RUN_S passes), its median and quartiles over the blocks. Gradients in `grad_to_none` are reset before
    each call so none accumulates."""
    if device == "cuda":
        import triton.testing

        q25, med, q75 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                quantiles=[0.25, 0.5, 0.75])
        return Timing(float(med), float(q25), float(q75), reps=0)
    from torch.utils import benchmark

    leaves = list(grad_to_none or [])

    def call():
        for t in leaves:
            t.grad = None
        fn()

    m = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads()).adaptive_autorange(
        threshold=NOISY_SPREAD, min_run_time=0.01, max_run_time=CPU_MAX_RUN_S)
    times = torch.tensor(m.times, dtype=torch.float64)
    q25, q75 = (float(times.quantile(q)) for q in (0.25, 0.75))
    return Timing(m.median * 1e3, q25 * 1e3, q75 * 1e3, reps=m.number_per_run * len(m.times))


def env_facts() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                          text=True, timeout=10).stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()})")
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "commit": commit, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _inputs(s: Shape, device: str, dtype: torch.dtype, grads: bool):
    g = dict(device=device, dtype=dtype)
    W = torch.randn(s.N, s.K, **g) / s.K**0.5
    b = torch.randn(s.N, **g)
    A = (torch.randn(s.E, s.r, s.K, **g) / s.K**0.5).requires_grad_(grads)
    B = (torch.randn(s.E, s.N, s.r, **g) / s.r**0.5).requires_grad_(grads)
    sets = []
    for _ in range(ROTATIONS):
        x = torch.randn(s.T, s.K, **g).requires_grad_(grads)
        probs = torch.softmax(torch.randn(s.T, s.E, device=device), -1)
        if s.top_k:
            top = probs.topk(s.top_k, dim=-1)
            gates = TopKGates(top.indices, (top.values / top.values.sum(-1, keepdim=True)).requires_grad_(grads),
                              validate=False)
        else:
            gates = probs.requires_grad_(grads)
        sets.append((x, gates))
    return W, b, A, B, sets


def _leaf(gates):
    return gates.weights if isinstance(gates, TopKGates) else gates


def bench_case(s: Shape, mode: str, providers: list[str], device: str, dtype: torch.dtype, progress=None):
    """Rows for one shape and mode; 'base' must come first (the ratio's denominator)."""
    torch.manual_seed(0)
    grads = mode != "fwd"
    W, b, A, B, sets = _inputs(s, device, dtype, grads)
    scale = torch.full((s.E,), 2.0, device=device)
    dy = torch.randn(s.T, s.N, device=device, dtype=dtype)
    rows, base_ms = [], None
    for name in providers:
        if progress is not None:
            progress.set_postfix_str(f"{name} {mode} {s.label()}")
        row = {"provider": name, "mode": mode, "shape": s.name, "T": s.T, "K": s.K, "N": s.N, "E": s.E, "r": s.r,
               "top_k": s.top_k, "dtype": str(dtype).replace("torch.", "")}
        why = unavailable(name, device)
        if why:
            row["error"] = why
        else:
            try:
                row.update(_time_provider(name, mode, s, device, W, b, A, B, sets, scale, dy))
                if name == "base":
                    base_ms = row["ms"]
                row["ratio_to_base"] = round(row["ms"] / base_ms, 3) if base_ms else None
            except Exception as exc:  # recorded in the row, not fatal: one provider failing must not lose the run
                row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def _time_provider(name, mode, s, device, W, b, A, B, sets, scale, dy):
    fwd = make_provider(name)
    if s.top_k and name not in OUR_BACKENDS:  # what they would compute: dense gates, zeros off the top-k
        fwd_dense = fwd
        fwd = lambda x, W, b, A, B, g, sc: fwd_dense(x, W, b, A, B, g.to_dense(s.E), sc)  # noqa: E731
    leaves = [A, B] + [t for x, g in sets for t in (x, _leaf(g))] if mode != "fwd" else []
    step = iter(range(1 << 62))

    def next_inputs():
        return sets[next(step) % ROTATIONS]

    if mode == "fwd":
        def fn():
            x, g = next_inputs()
            with torch.no_grad():
                return fwd(x, W, b, A, B, g, scale)
    elif mode == "fwdbwd":
        def fn():
            x, g = next_inputs()
            fwd(x, W, b, A, B, g, scale).backward(dy)
    else:
        outs = [fwd(x, W, b, A, B, g, scale) for x, g in sets]

        def fn():
            outs[next(step) % ROTATIONS].backward(dy, retain_graph=True)
    fn()  # compilation and first launches stay out of the timing and the memory peak
    before = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    timing = time_call(fn, device, grad_to_none=leaves)
    ms = timing.median_ms
    out = {"ms": float(f"{ms:.5g}"), "q25_ms": float(f"{timing.q25_ms:.5g}"), "q75_ms": float(f"{timing.q75_ms:.5g}"),
           "spread": round(timing.spread, 4), "noisy": timing.spread > NOISY_SPREAD, "reps": timing.reps,
           "tflops": float(f"{flops(mode, s, name) / ms / 1e9:.4g}")}
    if device == "cuda":
        out["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    for t in leaves:
        t.grad = None
    triton_ops = sys.modules.get("personafuse_kernels.ops.routed_lora_triton")
    if triton_ops is not None:  # TMA configs that failed to compile so far: their rows ran the pointer kernel
        out["tma_fallbacks"] = len(triton_ops.TMA_FALLBACKS)
    return out


def run(shapes: list[Shape], modes: list[str], providers: list[str], device: str, dtype: torch.dtype,
        show_progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    if providers[0] != "base":
        providers = ["base"] + [p for p in providers if p != "base"]
    facts = env_facts()
    rows = []
    with tqdm(total=len(shapes) * len(modes) * len(providers), desc="bench", file=sys.stderr,
              disable=not show_progress) as progress:
        for s in shapes:
            for mode in modes:
                rows += [{**r, **facts} for r in bench_case(s, mode, providers, device, dtype, progress)]
    return rows


def save_rows(rows: list[dict], out: Path, stem: str = "rows") -> list[Path]:
    import csv
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    fields = sorted({k for r in rows for k in r})
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [out / f"{stem}.json", out / f"{stem}.csv"]


def format_table(rows: list[dict]) -> str:
    """Base in ms; every other provider as its ratio to base in the same run ('n/a' where it cannot run). A cell
    whose timing spread (IQR over median) is over 10% ends in '~', and a legend line says so."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    head = f"{'shape':<40}{'mode':<8}" + "".join(f"{p:>10} " for p in providers)
    lines = [head, "-" * len(head)]
    seen = []
    for r in rows:
        if row_key(r) not in seen:
            seen.append(row_key(r))
    for key in seen:
        cells = []
        for p in providers:
            match = [r for r in rows if row_key(r) == key and r["provider"] == p]
            if not match:
                cells.append("")
            elif "error" in match[0]:
                cells.append("n/a")
            else:
                r = match[0]
                cell = f"{r['ms']:.3f}ms" if p == "base" else f"{r['ratio_to_base']:.2f}x"
                cells.append(cell + ("~" if r.get("noisy") else " "))
        lines.append(f"{key[0].label():<40}{key[1]:<8}" + "".join(f"{c:>11}" for c in cells))
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        lines.append(f"~ noisy: interquartile range over {NOISY_SPREAD:.0%} of the median in {len(noisy)} of "
                     f"{sum('ms' in r for r in rows)} timings (worst {worst['spread']:.0%}, {worst['provider']} "
                     f"{worst['mode']}); rerun on an idle machine before reading those ratios")
    return "\n".join(lines)


def row_key(r: dict) -> tuple:
    """(Shape, mode) of a saved row."""
    return Shape(r["T"], r["K"], r["N"], r["E"], r["r"], r.get("shape", ""), r.get("top_k", 0)), r["mode"]
