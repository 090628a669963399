"""Smoke test of ``benchmarks/recovery_ab.py``: two arms side by side, the documented shape.

Structure only (one task, one optimizer, one seed, the one-off faults): the numbers belong in
docs/recovery.md. Two arms that differ only in a setting the run never reaches give the same
row, so that a difference the tool reports is the setting's.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import recovery as R  # noqa: E402
from benchmarks import recovery_ab as ab  # noqa: E402


def test_two_arms_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(R, "FAM_CACHE", tmp_path / "cache")
    level = logging.getLogger("lrwatch").level
    out = tmp_path / "ab.json"
    assert ab.main(["--arm", "a={}", "--arm", 'b={"max_skips": 7}', "--parts", "faults",
                    "--seeds", "0", "--tasks", "synth_clf_mlp", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert logging.getLogger("lrwatch").level == level   # nothing leaks into later tests
    assert "| part | a | b |" in table and "| faults | " in table
    rows = json.loads(out.read_text())["faults"]
    assert [(r["fault"], r["seed"]) for r in rows] == [(f, 0) for f in R.FAM_FAULTS] * len(
        R.FAM_OPTS)
    for r in rows:
        assert set(r["a"]) == {"value", "watched", "rollbacks", "ok", "ok_watched"}
        assert r["a"] == r["b"]            # max_skips: nothing skips here


def test_bad_arms_are_refused() -> None:
    for argv in (["--arm", "a={}"], ["--arm", "a", "--arm", "b={}"],
                 ["--arm", "a=[1]", "--arm", "b={}"], ["--arm", "a={}", "--arm", "b={}",
                                                      "--parts", "nope"]):
        with pytest.raises(SystemExit):
            ab.main(argv)
