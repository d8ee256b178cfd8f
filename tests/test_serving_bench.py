"""The serving benchmark and its recipe: a batch of requests with persona mixes, single personas and none, over
unequal lengths; routed batch, per-request merging and peft's mixed-adapter batch must compute the same logits
(the benchmark checks that before any time counts), and the rows say what was measured."""
import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_serving_rows_cover_every_method():
    from personafuse_kernels.bench.serving import format_rows, run_serving

    rows = run_serving(n_requests=6, E=4, rank=4, hidden=32, layers=1, vocab=64, min_len=2, max_len=12, repeats=1)
    methods = [r["method"] for r in rows]
    assert methods == ["base", "routed", "merge", "base (single/none)", "peft-mixed (single/none)",
                       "routed (single/none)"]
    full, sub = rows[0], rows[3]
    assert full["requests"] == 6 and sub["requests"] == 4  # two mixes, two single personas, two without adapters
    assert full["ratio"] == 1.0 and sub["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tokens/s" in format_rows(rows)


def test_serving_recipe_and_bench_preset(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import serving

    assert serving.main(["--requests", "3", "--experts", "3", "--rank", "4", "--hidden", "32", "--layers", "1",
                         "--max-len", "10", "--repeats", "1", "--out", str(tmp_path / "recipe")]) == 0
    rows = json.loads((tmp_path / "recipe" / "rows.json").read_text())
    assert {r["method"] for r in rows} >= {"routed", "merge", "peft-mixed (single/none)"}
    with pytest.raises(SystemExit):
        serving.main(["--requests", "2"])

    from personafuse_kernels.cli import main

    assert main(["bench", "--shapes", "serving", "--quick", "--no-plot", "--device", "cpu",
                 "--out", str(tmp_path / "bench")]) == 0
    assert "peft-mixed" in capsys.readouterr().out and (tmp_path / "bench" / "serving.json").exists()
