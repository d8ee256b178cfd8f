"""Static resource tables of the Triton kernels, without a GPU: runs tests/aot_compile.py (the sm_90a compile gate's
compiler) under the package's Triton and under the side environment's Triton 3.6.0, for sm_90a and sm_80, and writes
one JSON-lines file and one Markdown table per (Triton version, arch) under benchmarks/results/static/.

    python benchmarks/static_report.py [--out benchmarks/results/static] [--side .venv-triton3.6.0/bin/python]

Each row: kernel case, regime (decode: T <= 64; large), dtype, registers, spill stores/loads (bytes), shared memory
(bytes), CTAs per SM, ptxas warnings, whether wgmma was emitted, and whether a default call launches it (hot).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(python: str, arch: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    res = subprocess.run([python, str(ROOT / "tests" / "aot_compile.py"), "--arch", arch, "--matrix", "all"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict], triton: str, arch: str) -> str:
    lines = [f"# Triton {triton}, {arch}: static resources of every kernel case", "",
             f"Written by benchmarks/static_report.py on {date.today().isoformat()} at commit {commit()}, without a "
             "GPU (ptxas -v of the AOT compile; shapes K = N = 4096, dense E = 10, top-k E = 64, k = 2, r = 16; "
             "decode T = 16, large T = 4096). hot: launched by a default call (gated in CI: no spill, no ptxas "
             "warning).", "",
             "| case | regime | dtype | hot | regs | spill st/ld (B) | smem (B) | CTAs/SM | wgmma | warnings |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['case']} | {r['regime']} | {r['dtype']} | {'yes' if r['hot'] else ''} | compile "
                         f"failed: {r.get('error', '')[:80]} | | | | | |")
            continue
        warn = "; ".join(w.split(")")[0] + ")" for w in r["warnings"])
        lines.append(f"| {r['case']} | {r['regime']} | {r['dtype']} | {'yes' if r['hot'] else ''} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | "
                     f"{r['ctas_per_sm']} | {'yes' if r['wgmma'] else ''} | {warn} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "static"))
    ap.add_argument("--side", default=str(ROOT / ".venv-triton3.6.0" / "bin" / "python"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pythons = [sys.executable] + ([args.side] if Path(args.side).exists() else [])
    for python in pythons:
        for arch in ("90a", "80"):
            rows = run(python, arch)
            triton = rows[0]["triton"]
            stem = f"triton-{triton}_sm{arch}"
            (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / f"{stem}.md").write_text(markdown(rows, triton, f"sm_{arch}"))
            gated = [r for r in rows if r["hot"] and (r.get("spill_stores") or r.get("warnings") or not r["ok"])]
            print(f"{stem}: {len(rows)} cases, {sum(r['hot'] for r in rows)} hot, {len(gated)} hot with a spill, "
                  f"warning or failure -> {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
