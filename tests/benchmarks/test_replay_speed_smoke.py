"""Smoke test of benchmarks/replay_speed.py: its traces are valid, its faults fire, and it
prints its table and writes its JSON. Output shape only, never timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import replay_speed as bench  # noqa: E402
from lrwatch.rules import load_pack  # noqa: E402
from lrwatch.rules.replay import replay_trace  # noqa: E402


def test_generated_traces_replay_and_their_faults_fire(tmp_path: Path) -> None:
    paths = bench.write_traces(tmp_path, 5, 200)     # run 4 is the first faulty one (a NaN)
    rules = load_pack("training")
    results = [replay_trace(p, rules) for p in paths]
    assert all(r.error is None and r.samples == 200 for r in results)
    assert any(e.rule == "nonfinite" and e.kind == "firing" for e in results[4].events)


def test_prints_the_table_and_writes_json(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "speed.json"
    assert bench.main(["--traces", "3", "--steps", "50", "--jobs", "1", "--json",
                       str(out)]) == 0
    text = capsys.readouterr().out
    assert "| in-process (1 process) | 1 |" in text and "| lrwatch replay DIR | 1 |" in text
    result = json.loads(out.read_text())
    assert result["traces"] == 3 and result["target_s_per_100"] == 1.0
    assert {r["how"] for r in result["rows"]} == {"in-process (1 process)",
                                                  "lrwatch replay DIR"}
    firings = {r["firings"] for r in result["rows"]}
    assert len(firings) == 1   # the command finds what the in-process replay finds
