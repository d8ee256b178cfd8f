"""A PNG drawn from saved benchmark rows: ratio to the base linear, and speed-up over the per-expert loop."""
from __future__ import annotations

from pathlib import Path

from .kernel_bench import row_key

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install 'personafuse-kernels[bench]' draws bench.png"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_rows(rows: list[dict], path: Path, mode: str = "fwdbwd") -> Path | None:
    """Two panels per shape for one mode, each bar with its interquartile range as a whisker; returns the PNG path,
    or None when there are no rows to draw. Raises ImportError (saying which extra to install) without
    matplotlib."""
    if not have_matplotlib():
        raise ImportError(MISSING_MATPLOTLIB)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mode"] == mode and "error" not in r]
    if not rows:
        return None
    keys = []
    for r in rows:
        if row_key(r)[0] not in keys:
            keys.append(row_key(r)[0])
    providers = [p for p in ("loop", "xlora", "stacked", "compile", "torch", "triton", "cuda")
                 if any(r["provider"] == p for r in rows)]
    ours = [p for p in providers if p in ("torch", "triton", "cuda")]

    def value(key, provider, field):
        for r in rows:
            if row_key(r)[0] == key and r["provider"] == provider:
                return r.get(field)
        return None

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(keys) + 4), 4.8))
    width = 0.8 / max(len(providers), 1)
    xs = range(len(keys))
    for i, p in enumerate(providers):
        ratios = [value(k, p, "ratio_to_base") or 0 for k in keys]
        # whiskers: the provider's quartiles over the base median of the same shape
        low, high = [], []
        for k, ratio in zip(keys, ratios):
            base, q25, q75 = value(k, "base", "ms"), value(k, p, "q25_ms"), value(k, p, "q75_ms")
            ok = ratio and base and q25 is not None and q75 is not None
            low.append(max(ratio - q25 / base, 0) if ok else 0)
            high.append(max(q75 / base - ratio, 0) if ok else 0)
        ax1.bar([x + i * width for x in xs], ratios, width, label=p, yerr=[low, high], capsize=2,
                error_kw={"elinewidth": 0.8})
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_ylabel("time / base F.linear (lower is better)")
    ax1.set_title(f"{mode}: ratio to the base linear, same run (whiskers: IQR)")
    width2 = 0.8 / max(len(ours), 1)
    for i, p in enumerate(ours):
        speedups = []
        for k in keys:
            loop, mine = value(k, "loop", "ms"), value(k, p, "ms")
            speedups.append(loop / mine if loop and mine else 0)
        ax2.bar([x + i * width2 for x in xs], speedups, width2, label=p)
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_ylabel("speed-up over the per-expert loop")
    ax2.set_title(f"{mode}: speed-up over the loop")
    labels = [k.label().replace(" E=", "\nE=") for k in keys]
    for ax, n in ((ax1, len(providers)), (ax2, len(ours))):
        ax.set_xticks([x + 0.4 - 0.4 / max(n, 1) for x in xs])
        ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
        ax.legend(fontsize=8)
    device = rows[0].get("device", "") if rows else ""
    fig.suptitle(f"routed LoRA, {device}, commit {rows[0].get('commit', '') if rows else ''}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
