"""Benchmark the routed LoRA op: the same as `personafuse bench` (personafuse_kernels/bench/), runnable from a
checkout without installing the console script.

    python benchmarks/bench_routed_lora.py --shapes issue --out results/run1       # on a GPU
    python benchmarks/bench_routed_lora.py --quick                                  # CPU smoke test
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from personafuse_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
