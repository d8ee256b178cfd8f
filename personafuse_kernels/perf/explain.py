"""`personafuse explain`: the kernels one call launches, what each costs on a card, and the predicted ratio to the
base F.linear, from a dry run of the real launchers on meta tensors (perf/dryrun.py) and the roofline of
perf/costs.py.

    explain(T, K, N, E, r, k=0, dtype="bf16", backend="triton", mode="fwd", card="H200") -> Explanation

backend: this package's "triton", "cuda" (the CUDA extension's ops, each expanded into the kernels its C++
launcher starts: perf/cuda_launches.py; needs the extension built, not a GPU) or "torch", or the providers it is
compared with: "base" (F.linear alone), "stacked" (two cuBLAS GEMMs and an elementwise gate, autograd), "loop"
(the per-expert loop, as peft's X-LoRA), "probe" (the one-accumulator TMA fused GEMM of the H200 calibration: the
triton forward's dual GEMM alone).
mode: "fwd", "bwd" or "fwdbwd" (W frozen: gradients of x, lora_A, lora_B and the gates), the words of
`personafuse bench`. The JSON form (Explanation.to_json) is documented in docs/cost-model.md.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import cuda_launches
from .cards import Card, card_for_device
from .cards import card as get_card
from .costs import (
    ASSUMPTIONS,
    UNMEASURED_KINDS,
    Cost,
    aten_cost,
    host_time_ms,
    launch_time_ms,
    timeline_ms,
    triton_cost,
)
from .dryrun import Launch, recording

BACKENDS = ("triton", "cuda", "torch", "base", "stacked", "loop", "probe")
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEMA = 3


@dataclass
class KernelRow:
    phase: str  # fwd or bwd
    source: str  # triton or aten
    name: str
    grid: list
    config: dict
    kind: str
    gflop: float
    mbytes: float
    ms: float
    host_ms: float


@dataclass
class Explanation:
    schema: int
    card: str
    backend: str
    mode: str
    dtype: str
    shape: dict
    kernels: list = field(default_factory=list)
    gpu_ms: float = 0.0
    host_ms: float = 0.0
    total_ms: float = 0.0
    base_ms: float = 0.0
    ratio: float = 0.0
    base_gpu_ms: float = 0.0  # the base's GPU busy time
    gpu_ratio: float = 0.0  # gpu_ms / base_gpu_ms: the ratio with host time hidden (a captured CUDA graph)
    bound: str = ""  # "gpu" (the GPU is busy at least 90 % of the call) or "host"
    calibrated: bool = True  # False in the regime where the model missed a measured row (uncalibrated_reason)
    uncalibrated_reason: str = ""
    assumptions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        s = self.shape
        top = f" top-{s['k']}" if s["k"] else ""
        lines = [f"{self.backend} {self.mode} on {self.card}, {self.dtype}: T={s['T']} K={s['K']} N={s['N']} "
                 f"E={s['E']} r={s['r']}{top}",
                 f"{'#':>3} {'phase':<5} {'kernel':<28} {'grid':<16} {'GFLOP':>8} {'MB':>8} {'ms':>8}  config"]
        for i, k in enumerate(self.kernels):
            cfg = " ".join(f"{key}={val}" for key, val in k.config.items())
            lines.append(f"{i + 1:>3} {k.phase:<5} {k.name[:28]:<28} {str(tuple(k.grid)) if k.grid else '-':<16} "
                         f"{k.gflop:>8.2f} {k.mbytes:>8.1f} {k.ms:>8.4f}  {cfg[:70]}")
        lines.append(f"GPU busy {self.gpu_ms:.4f} ms, host {self.host_ms:.4f} ms -> {self.total_ms:.4f} ms "
                     f"({self.bound}-bound); base F.linear {self.base_ms:.4f} ms; predicted ratio {self.ratio:.2f}x")
        lines.append(f"GPU time alone (host hidden, as in a captured CUDA graph): {self.gpu_ms:.4f} ms against the "
                     f"base's {self.base_gpu_ms:.4f} ms: {self.gpu_ratio:.2f}x")
        if not self.calibrated:
            lines.append(f"UNCALIBRATED: {self.uncalibrated_reason}")
        return "\n".join(lines)


def _inputs(T, K, N, E, r, k, dtype, grads: bool):
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(T, K, **meta, requires_grad=grads)
    W = torch.empty(N, K, **meta)
    b = torch.empty(N, **meta)
    A = torch.empty(E, r, K, **meta, requires_grad=grads)
    B = torch.empty(E, N, r, **meta, requires_grad=grads)
    if k:
        gates = (torch.empty(T, k, device="meta", dtype=torch.int64),
                 torch.empty(T, k, device="meta", dtype=torch.float32, requires_grad=grads))
    else:
        gates = torch.empty(T, E, device="meta", dtype=torch.float32, requires_grad=grads)
    scaling = torch.empty(E, device="meta", dtype=torch.float32)
    return x, W, b, A, B, gates, scaling


def _autograd_provider(fn, inputs, mode, card, k):
    """A provider written with torch ops: forward under the recorder, then backward through autograd."""
    x, W, b, A, B, gates, scaling = inputs
    if k:
        from ..routing.topk import dense_gates

        g = dense_gates(gates[0], gates[1], A.shape[0])
    else:
        g = gates
    out = []
    with recording(card, triton=False) as fwd:
        y = fn(x, W, b, A, B, g, scaling)
    if mode in ("fwd", "fwdbwd"):
        out += [("fwd", launch) for launch in fwd]
    if mode in ("bwd", "fwdbwd"):
        dy = torch.empty_like(y)
        with recording(card, triton=False) as bwd:
            y.backward(dy)
        out += [("bwd", launch) for launch in bwd]
    return out


def _backend_provider(name: str, inputs, mode, card, k, needs):
    """This package's backend modules, called as RoutedLoRAFunction / RoutedLoRATopKFunction call them."""
    from ..dispatch import get_backend_ops, topk_block_m

    x, W, b, A, B, gates, scaling = inputs
    seed = torch.empty(0, device="meta", dtype=torch.int64)
    out = []
    with recording(card) as fwd:
        if k:
            indices, weights = gates
            ops = get_backend_ops(name, topk=True)
            y, saved, meta = ops.forward(x, W, b, A, B, indices, weights, scaling, seed, 0.0,
                                         topk_block_m(name, *indices.shape))
        else:
            ops = get_backend_ops(name)
            y, saved = ops.forward(x, W, b, A, B, gates, scaling, seed, 1, 0.0)
    if mode in ("fwd", "fwdbwd"):
        out += [("fwd", launch) for launch in fwd]
    if mode in ("bwd", "fwdbwd"):
        dy = torch.empty_like(y)
        with recording(card) as bwd:
            if k:
                ops.backward(dy, x, W, A, B, indices, weights, scaling, seed, saved, 0.0, meta, needs)
            else:
                ops.backward(dy, x, W, A, B, gates, scaling, seed, saved, 1, 0.0, needs)
        out += [("bwd", launch) for launch in bwd]
    return out


def dry_run(T: int, K: int, N: int, E: int, r: int, k: int = 0, dtype: str = "bf16", backend: str = "triton",
            mode: str = "fwd", card: str | Card = "H200") -> list[tuple[str, Launch]]:
    """(phase, Launch) of every kernel one call launches, in order, as on `card`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    c = get_card(card) if isinstance(card, str) else card
    grads = mode != "fwd"
    inputs = _inputs(T, K, N, E, r, k, DTYPES[dtype], grads)
    from ..autograd import Needs

    needs = Needs(x=True, weight=False, bias=False, lora_A=True, lora_B=True, gates=True)
    if backend == "base":
        return _autograd_provider(lambda x, W, b, A, B, g, s: torch.nn.functional.linear(x, W, b), inputs, mode, c, k)
    if backend == "stacked":
        from ..bench.providers import stacked_lora

        return _autograd_provider(stacked_lora, inputs, mode, c, k)
    if backend == "loop":
        from ..bench.providers import loop_lora

        return _autograd_provider(loop_lora, inputs, mode, c, k)
    if backend == "cuda":
        from .._extension import extension_error

        error = extension_error()
        if error is not None:
            raise ValueError(f"backend 'cuda' dry-runs the CUDA extension's ops (no GPU needed), but {error}")
    if backend == "probe":
        if k or mode != "fwd":
            raise ValueError("the TMA probe is a dense forward GEMM: backend='probe' takes k=0 and mode='fwd'")
        rows = _backend_provider("triton", inputs, "fwd", c, 0, needs)
        return [(p, launch) for p, launch in rows if launch.name in ("_dual_gemm_tma_kernel", "_dual_gemm_kernel")]
    return _backend_provider(backend, inputs, mode, c, k, needs)


def _rows(phase: str, launch: Launch, c: Card, dtype_bytes: int) -> list[KernelRow]:
    """The kernel rows of one recorded launch: one, or for an extension op each kernel its launcher starts (the
    op's host time on the first)."""
    host = host_time_ms(launch, phase == "bwd")
    if launch.source == "cuda":
        rows = []
        for kernel in cuda_launches.kernels(launch.name, launch.args, c.sms):
            cost = Cost(kernel.flops, kernel.bytes, kernel.kind, grid_syncs=kernel.config.get("grid_syncs", 0),
                        l2_bytes=kernel.l2_bytes)
            config = dict(kernel.config, threads=kernel.threads, smem=kernel.smem, op=launch.name)
            rows.append(KernelRow(phase, "cuda", kernel.name, [kernel.grid], config, kernel.kind, kernel.flops / 1e9,
                                  kernel.bytes / 1e6, launch_time_ms(cost, c, dtype_bytes), 0.0 if rows else host))
        return rows
    cost = triton_cost(launch, c) if launch.source == "triton" else aten_cost(launch)
    config = dict(launch.options)
    if launch.source == "triton":
        config.update({key: v for key, v in launch.args.items() if key.isupper() and not isinstance(v, torch.Tensor)
                       and key.startswith(("BLOCK", "SPLIT", "GROUP", "NUM", "EPI", "MODE", "Q_MODE", "HAS", "WARP",
                                           "EXPERTS", "R_PAD", "M_TRANS", "DROPOUT"))})
    return [KernelRow(phase, launch.source, launch.name, list(launch.grid), config, cost.kind, cost.flops / 1e9,
                      cost.bytes / 1e6, launch_time_ms(cost, c, dtype_bytes), host)]


def explain(T: int, K: int, N: int, E: int, r: int, k: int = 0, dtype: str = "bf16", backend: str = "triton",
            mode: str = "fwd", card: str = "H200") -> Explanation:
    """The kernels of one call on `card`, their costs, and the predicted ratio to F.linear in the same mode."""
    c = get_card(card)
    dtype_bytes = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    rows = [row for p, launch in dry_run(T, K, N, E, r, k, dtype, backend, mode, c)
            for row in _rows(p, launch, c, dtype_bytes)]
    # base, stacked and loop run backward through autograd's engine; our backends' backward is one autograd node
    # whose launches are issued by its own Python
    total, gpu, host = timeline_ms(rows, autograd_backward=backend in ("base", "stacked", "loop"))
    if backend == "base":
        base, base_gpu = total, gpu
    else:
        base_mode = "fwd" if backend == "probe" else mode
        b = explain(T, K, N, E, r, 0, dtype, "base", base_mode, card)
        base, base_gpu = b.total_ms, b.gpu_ms
    reason = _uncalibrated(mode, gpu, host, rows)
    return Explanation(SCHEMA, c.key, backend, mode, dtype, {"T": T, "K": K, "N": N, "E": E, "r": r, "k": k}, rows,
                       gpu, host, total, base, total / base if base else float("nan"), base_gpu,
                       gpu / base_gpu if base_gpu else float("nan"), "gpu" if gpu >= 0.9 * total else "host",
                       not reason, reason, dict(ASSUMPTIONS))


def _uncalibrated(mode: str, gpu_ms: float, host_ms: float, rows: list[KernelRow]) -> str:
    """Why a prediction is not backed by the calibration, or "":
    - a backward whose host time is comparable to its GPU time: the stacked training step at T = 4096 (host time
      1.3x its GPU time) came out 35 % low, while the one at T = 16384 (host 0.4x) held;
    - GPU time mostly in kernels whose efficiency no measured row has fixed (the CUDA extension's, until a GPU
      times them: costs.UNMEASURED_KINDS)."""
    reasons = []
    if mode != "fwd" and host_ms >= 0.5 * gpu_ms:
        reasons.append(f"a backward whose host time ({host_ms:.3f} ms) is at least half its GPU time ({gpu_ms:.3f} "
                       f"ms): the regime where the model came out 35 % low on the measured stacked training step "
                       f"(docs/cost-model.md)")
    unmeasured = sum(row.ms for row in rows if row.kind in UNMEASURED_KINDS)
    if gpu_ms and unmeasured >= 0.5 * gpu_ms:
        reasons.append(f"{unmeasured:.3f} of the {gpu_ms:.3f} ms of GPU time is in kernels whose efficiency no "
                       f"measured row has fixed ({', '.join(UNMEASURED_KINDS)}: assumed, docs/cost-model.md)")
    return "; ".join(reasons)


# ------------------------------------------------------------------ calibration against measured rows

ANCHORS_FILE = Path(__file__).resolve().parents[1] / "data" / "h200_anchors.json"


def anchors() -> list[dict]:
    """The measured H200 rows the model is held to: provider, mode, shape, measured ratio to F.linear."""
    return json.loads(ANCHORS_FILE.read_text())["rows"]


def calibration(tolerance: float = 0.15) -> list[dict]:
    """Each anchor row beside the model's ratio for it, the relative error, and whether it is within tolerance."""
    out = []
    for row in anchors():
        T, K, N, E, r = row["shape"]
        got = explain(T, K, N, E, r, 0, "bf16", row["provider"], row["mode"], row["card"]).ratio
        err = got / row["ratio"] - 1.0
        out.append({**row, "predicted": round(got, 3), "error": round(err, 3), "within": abs(err) <= tolerance})
    return out


# ------------------------------------------------------------------ against a benchmark run

_BENCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def against_measured(rows: list[dict], tolerance: float = 0.15) -> list[dict]:
    """Rows of `personafuse bench` (its rows.json) beside the model's prediction for each: provider, mode, shape,
    card (from the row's device name), measured ratio to F.linear, predicted ratio (and the GPU-only ratio), the
    relative error, whether it is within tolerance. Rows the model cannot price (another card, a provider it does
    not model, an error row) come back with `skipped` saying why. This is the first step of calibrating on a GPU:
    benchmarks/gpu_check.sh runs it after its benchmarks."""
    out = []
    for row in rows:
        if row.get("provider") == "base":
            continue
        key = {k: row.get(k) for k in ("provider", "mode", "T", "K", "N", "E", "r", "top_k", "device")}
        c = card_for_device(row.get("device", ""))
        why = ("the run failed: " + row["error"] if "error" in row else
               f"the model has no card for device {row.get('device')!r}" if c is None else
               f"provider {row['provider']!r} is not modeled" if row["provider"] not in BACKENDS else
               f"dtype {row.get('dtype')!r} is not modeled" if row.get("dtype") not in _BENCH_DTYPES else
               "no ratio to base in the row" if not row.get("ratio_to_base") else "")
        if why:
            out.append({**key, "skipped": why})
            continue
        try:
            e = explain(row["T"], row["K"], row["N"], row["E"], row["r"], row.get("top_k") or 0,
                        _BENCH_DTYPES[row["dtype"]], row["provider"], row["mode"], c.key)
        except ValueError as exc:  # e.g. the cuda backend where the extension is not built
            out.append({**key, "skipped": str(exc)})
            continue
        measured = row["ratio_to_base"]
        err = e.ratio / measured - 1.0
        out.append({**key, "card": c.key, "measured": measured, "predicted": round(e.ratio, 3),
                    "predicted_gpu": round(e.gpu_ratio, 3), "error": round(err, 3), "within": abs(err) <= tolerance,
                    "calibrated": e.calibrated})
    return out
