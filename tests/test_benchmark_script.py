"""The benchmark script runs (CPU quick mode), writes rows with the run's facts, and rejects bad arguments."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_routed_lora.py"


def test_quick_run_writes_rows(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--providers", "base,loop,stacked,torch",
                          "--shapes", "3,32,48,4,8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["provider"] for r in rows} == {"base", "loop", "stacked", "torch"}
    assert all(r["ms"] > 0 and r["commit"] and r["device"].startswith("cpu") for r in rows)
    base = [r for r in rows if r["provider"] == "base" and r["mode"] == "fwd"][0]
    assert base["ratio_to_base"] == 1.0
    import csv

    with open(tmp_path / "rows.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and [r["provider"] for r in csv_rows] == [r["provider"] for r in rows]
    assert "ratio to base" in res.stdout


def test_bad_arguments_exit_2():
    for args in (["--providers", "nope"], ["--shapes", "1,2,3"], ["--modes", "sideways"]):
        res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, (args, res.stderr)
