"""Benchmarks behind `personafuse bench`: op-level providers x modes x shapes, end-to-end training, plots."""
from .kernel_bench import MODES, Shape, format_table, parse_shapes, preset_shapes, run, save_rows
from .providers import PROVIDERS, make_provider, per_expert_loop

__all__ = ["MODES", "PROVIDERS", "Shape", "format_table", "make_provider", "parse_shapes", "per_expert_loop",
           "preset_shapes", "run", "save_rows"]
