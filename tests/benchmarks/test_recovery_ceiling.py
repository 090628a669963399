"""`benchmarks/recovery_ceiling.py` on one task and optimizer (bare runs in a fresh cache): the
oracle table, the cuts and the mid-run range test run end to end and count consistently. The
measurement's numbers are not asserted here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import recovery as R  # noqa: E402
from benchmarks import recovery_ceiling as rc  # noqa: E402


def test_ceiling_cuts_and_mid_check_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(R, "FAM_CACHE", tmp_path / "cache")
    monkeypatch.setattr(rc, "CUTS", ((100, 0.1),))
    monkeypatch.setattr(rc, "CHECK_AT", (20,))
    out = tmp_path / "c.json"
    assert rc.main(["--tasks", "friedman_mlp", "--opts", "momentum", "--seeds", "0", "--cuts",
                    "--mid-check", "--second-check", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    c = res["ceiling"]
    n = c["n"]
    assert 0 < n <= 3                               # x3, x10, x30 whose bare run failed
    counts = [c["by_delay"][str(d)] for d in rc.DELAYS]
    assert all(0 <= k <= n for k in counts)
    assert sum(m for _, m in c["by_family"].values()) == n
    assert 0 <= res["cuts"]["100/0.1"]["healed"] <= n and res["cuts"]["100/0.1"]["tuned"] <= 1
    mc = res["mid_check"]["20"]
    assert mc["healed"] <= mc["cut"] <= n and mc["tuned_cut"] <= 1
    sc = res["second_check"]
    assert sc["adopted_again"] <= sc["adopted"] <= n
    assert sc["healed_once"] <= sc["adopted"] and sc["healed_twice"] <= sc["adopted"]
    text = capsys.readouterr().out
    assert f"would-diverge runs: {n}; tuned runs: 1" in text and "| 0 steps |" in text


def test_unknown_task_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert rc.main(["--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
