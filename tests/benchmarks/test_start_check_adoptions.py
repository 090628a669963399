"""`benchmarks/start_check_adoptions.py` on one task and optimizer (bare runs in a fresh
cache): the offline start check decides every run, trains both continuations of the runs it
cuts and counts them consistently. The measurement's numbers are not asserted here."""

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
from benchmarks import start_check_adoptions as sca  # noqa: E402


def test_adoptions_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(R, "FAM_CACHE", tmp_path / "cache")
    out = tmp_path / "a.json"
    assert sca.main(["--tasks", "friedman_mlp", "--opts", "rmsprop", "--seeds", "0",
                     "--mults", "1,30", "--jobs", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["runs"] == 2 and res["tuned"] == 1
    assert sum(res["outcomes"].values()) == res["cuts"] == sum(r["cut"] for r in res["rows"])
    for r in res["rows"]:
        assert r["cut"] == (r["adopt"] and (r["gate"] is None or r["gate"] > sca.GATE))
        assert ("outcome" in r) == r["cut"]
    # x30 under RMSprop overshoots at once: the gate opens and the tenth does better
    x30 = next(r for r in res["rows"] if r["mult"] == 30.0)
    assert x30["gate"] > sca.GATE and x30["real"] > x30["shadow"]
    assert "the check cuts" in capsys.readouterr().out


def test_unknown_task_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert sca.main(["--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
