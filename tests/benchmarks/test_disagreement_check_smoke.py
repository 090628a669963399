"""Smoke test of ``benchmarks/disagreement_check.py`` on a tiny size: the signals are computed
on the benchmark's windows, the leave-one-dataset-out summary never tunes on the held-out
dataset, and noisier inputs raise the shipped signal. Its numbers are not asserted here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import disagreement_check as check  # noqa: E402


def test_a_tiny_run_scores_every_window_and_summarises(tmp_path, capsys, monkeypatch):
    rows = check.run("disjoint", ["breast_cancer", "digits_parity"], ["gnb"], 1,
                     ("lda", "agreement"))
    variants = {r["variant"] for r in rows}
    assert {"none", "selection", "hard"} <= variants
    for r in rows:
        assert {"lda", "lda_bag", "agreement"} <= set(r["signals"])
        assert math.isfinite(r["signals"]["agreement"]["z"])
    noisy = [r["signals"]["agreement"]["z"] for r in rows
             if r["variant"] == "drop_noise" and r["window"] >= 3]
    clean = [r["signals"]["agreement"]["z"] for r in rows if r["variant"] == "none"]
    assert noisy and max(noisy) > max(clean)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    seen: list[set[str]] = []
    choose = check.choose
    monkeypatch.setattr(check, "choose", lambda rs, sig: (
        seen.append({r["dataset"] for r in rs}), choose(rs, sig))[1])
    check.main(["--summary", str(path), "--signals", "agreement"])
    out = capsys.readouterr().out
    assert "all, each held out" in out and "breast_cancer" in out
    assert seen == [{"digits_parity"}, {"breast_cancer"}]
