"""Smoke test of ``benchmarks/overhead.py``: it runs, and its output has the documented shape.

Timings are never asserted: the machine is shared and noisy, and the numbers belong in
``docs/overhead.md``, not in a test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lrwatch_bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "-q", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | params |" in proc.stdout
    assert "lrwatch all-on" in proc.stdout

    report = json.loads(out.read_text())
    bench = _load()
    assert report["benchmark"] == "overhead"
    assert report["machine"]["cpu_count"] >= 1
    assert report["config"]["clock"] in ("cpu", "wall")
    (result,) = report["results"]
    assert result["model"] == "tiny" and result["params"] > 0
    assert result["realistic"] is False
    assert list(result["variants"]) == list(bench.VARIANTS)
    for name, entry in result["variants"].items():
        for clock in ("wall", "cpu"):
            c = entry[clock]
            assert len(c["block_ms"]) == result["rounds"]
            assert all(math.isfinite(t) and t > 0 for t in c["block_ms"])
            assert c["ci_low"] <= c["ci_high"] and c["ratio"] > 0
        if name.startswith("lrwatch"):
            assert entry["internal_errors"] == 0  # the Watcher never failed open
            assert entry["flushes"] >= 1
        assert entry["target"] is None  # the tiny model has no target
    assert result["variants"]["baseline"]["ratio"] == pytest.approx(1.0)
    assert report["sync_debug"]["ran"] is False and report["sync_debug"]["reason"]
    assert report["table"].startswith("| model |")


def test_item_styles_measure_the_same_norm() -> None:
    """The Lightning- and Composer-style monitors compute the global gradient norm that
    ``clip_grad_norm_`` (and the Watcher) compute: the compared monitors measure the same thing."""
    bench = _load()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model(torch.randn(4, 8)).square().sum().backward()
    # max_norm=inf: measures the total norm without clipping anything.
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"), norm_type=2.0)
    lightning: list[dict[str, float]] = []
    composer: list[dict[str, float]] = []
    bench._lightning_style(model, lightning)
    bench._composer_style(model, composer)
    assert lightning[0]["grad_2.0_norm_total"] == pytest.approx(float(expected), rel=1e-5)
    assert composer[0]["l2_norm/grad/global"] == pytest.approx(float(expected), rel=1e-5)
    assert len(lightning[0]) == len(composer[0]) == 5  # 4 parameters + the total
    assert all(isinstance(v, float) for v in (*lightning[0].values(), *composer[0].values()))
