"""Smoke test of ``benchmarks/stall_calibration.py``: it runs and its output has its shape.

The rates themselves belong in ``docs/recovery.md``; here only a run small enough for CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "stall.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stall_calibration.py"),
                           "--reps", "2", "--steps", "400", "--long", "2000",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| noise | sigma | phi | per-window improvement | decisions | called stalled |" \
        in proc.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "stall_calibration" and len(report["rows"]) == 12
    for row in report["rows"]:
        assert row["decisions"] > 0 and 0.0 <= row["rate"] <= 1.0
        assert row["calls"] <= row["decisions"]
    assert "stall episodes per run of 2,000 values" in proc.stdout
    assert len(report["long"]) == 4
    # a run at the 1% threshold is called stalled at least as often as one improving 6%
    flat, fast = report["long"][0], report["long"][-1]
    assert flat["mean"] >= fast["mean"] and fast["runs_with_any"] <= flat["runs_with_any"]
