"""Smoke test of the detection benchmark's harness on three tiny real runs.

Structural checks only (labels consistent, a diverging run really reaches a non-finite value,
a fault is a real intervention into an otherwise identical run, anchors fire on an obvious NaN,
scoring produces every measure); the benchmark's numbers are not asserted here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import anchors  # noqa: E402
from benchmarks import detection as bench  # noqa: E402
from benchmarks import detection_runs as dr  # noqa: E402
from lrwatch.samples import Sample  # noqa: E402


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> bench.Suite:
    cache = tmp_path_factory.mktemp("detection")
    healthy = dr.RunSpec("digits_mlp", "momentum", "constant", 1.0, seed=0, steps=100)
    diverged = dr.RunSpec("diabetes_linear", "sgd", "constant", 30.0, seed=0, steps=100)
    spike = dr.RunSpec("digits_mlp", "momentum", "constant", 1.0, seed=0, steps=100,
                       fault="spike", onset=60, base=dr.run_id(healthy))
    scenarios = []
    for spec in (healthy, diverged, spike):
        path = cache / f"{dr.run_id(spec)}.trace.jsonl"
        dr.record_run(spec, path)
        samples = dr.load_samples(path)
        label = (dr.label_natural(samples) if spec.fault is None
                 else dr.label_faulted(samples, spec))
        scenarios.append(bench.Scenario(dr.run_id(spec), spec, path, label))
    return bench.Suite(cache, scenarios, [])


def _by_kind(suite: bench.Suite, kind: str) -> bench.Scenario:
    return next(sc for sc in suite.scenarios if sc.kind == kind)


def test_labels_are_consistent(tiny_suite: bench.Suite) -> None:
    kinds = sorted(sc.kind for sc in tiny_suite.scenarios)
    assert kinds == ["healthy", "natural_divergence", "spike"]
    for sc in tiny_suite.scenarios:
        samples = dr.load_samples(sc.path)
        nf = dr.first_nonfinite_step(samples)
        assert sc.label["first_nonfinite"] == nf
        steps = [s.step for s in samples]
        assert steps == list(range(1, len(steps) + 1))
        if sc.kind == "healthy":
            assert sc.label["onset"] is None and nf is None
            assert sc.label["final_loss"] <= dr.HEALTHY_LEARNED * sc.label["initial_loss"]
        else:
            assert sc.is_fault
            assert 1 <= sc.label["onset"] <= steps[-1]
            if nf is not None:
                assert sc.label["onset"] <= nf


def test_diverged_run_really_reaches_nonfinite(tiny_suite: bench.Suite) -> None:
    sc = _by_kind(tiny_suite, "natural_divergence")
    samples = dr.load_samples(sc.path)
    nf = sc.label["first_nonfinite"]
    assert nf is not None
    bad = next(s for s in samples if s.step == nf)
    assert any(not math.isfinite(v) for v in bad.values.values())
    assert all(math.isfinite(v) for s in samples if s.step < nf for v in s.values.values())
    # recording stops a fixed number of steps after the first non-finite value
    assert samples[-1].step == nf + dr.NONFINITE_TAIL
    # the raw trace carries the non-finite value as a string, per trace format v1
    assert any(tok in sc.path.read_text() for tok in ('"nan"', '"inf"'))


def test_fault_is_an_intervention_into_the_identical_base_run(tiny_suite: bench.Suite) -> None:
    base = _by_kind(tiny_suite, "healthy")
    fault = _by_kind(tiny_suite, "spike")
    onset = fault.label["onset"]
    a = {s.step: s.values for s in dr.load_samples(base.path)}
    b = {s.step: s.values for s in dr.load_samples(fault.path)}
    assert all(a[t] == b[t] for t in range(1, onset))           # same run before the onset
    assert b[onset]["loss"] > 2 * a[onset]["loss"]               # corrupted batch at the onset
    assert fault.label["loss_peak_after_onset"] > 2 * fault.label["loss_before_onset"]


def test_recording_is_deterministic(tmp_path: Path) -> None:
    spec = dr.RunSpec("wine_mlp", "adam", "cosine", 1.0, seed=3, steps=40)
    dr.record_run(spec, tmp_path / "a.jsonl")
    dr.record_run(spec, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_anchors_fire_on_an_obvious_nan() -> None:
    stream = [Sample(step=t, values={"loss": 1.0 + 0.01 * (t % 3), "grad_norm": 1.0,
                                     "eval_loss": 1.0 - 0.001 * t})
              for t in range(1, 150)]
    stream.append(Sample(step=150, values={"loss": math.nan, "grad_norm": math.nan,
                                           "eval_loss": math.nan}))
    nan_aware = {"keras_terminate_on_nan", "lightning_spike_detection", "olmo_core_skip_step",
                 "megatron_spiky_loss", "lightning_early_stopping"}
    for key, anchor in anchors.make_anchors().items():
        fired = [s.step for s in stream if anchor.update(s)]
        if key in nan_aware:
            assert fired and fired[-1] == 150, key
            assert 150 in fired
        if key == "keras_terminate_on_nan":
            assert fired == [150]


def test_anchors_on_recorded_runs(tiny_suite: bench.Suite) -> None:
    div = _by_kind(tiny_suite, "natural_divergence")
    samples = dr.load_samples(div.path)
    first_nan_loss = next(s.step for s in samples if not math.isfinite(s.values["loss"]))
    keras = anchors.KerasTerminateOnNaN()
    assert [s.step for s in samples if keras.update(s)][0] == first_nan_loss
    mega = anchors.MegatronSpikyLoss()
    assert [s.step for s in samples if mega.update(s)][0] == div.label["first_nonfinite"]
    healthy = dr.load_samples(_by_kind(tiny_suite, "healthy").path)
    keras = anchors.KerasTerminateOnNaN()
    assert not any(keras.update(s) for s in healthy)


def test_scoring_structure(tiny_suite: bench.Suite) -> None:
    dets = bench.anchor_detectors()
    lw, _why = bench.lrwatch_detectors(None)
    dets = lw + dets
    scored = bench.score_suite(tiny_suite, dets, log=lambda m: None)
    res = scored["detectors"]
    assert set(res) == {d.key for d in dets}
    for r in res.values():
        agg = r["all"]
        assert agg["faults"] == 2 and agg["healthy"] == 1 and agg["nonfinite_runs"] == 1
        assert 0 <= agg["caught"] <= 2 and 0 <= agg["warned"] <= 1
        assert set(r["by_kind"]) == {"natural_divergence", *dr.FAULT_KINDS}
    # Keras reacts only once the loss is non-finite: never a warning before it
    assert res["keras_terminate_on_nan"]["all"]["warned"] == 0
    assert len(scored["scenarios"]) == 3
    table = bench.format_table(res)
    assert "keras TerminateOnNaN" in table and "FA healthy" in table
    if lw:   # the engine is there: its non-finite rule must fire on the NaN run
        row = next(r for r in scored["scenarios"] if r["kind"] == "natural_divergence")
        assert row["detectors"]["lrwatch"]["first_alarm"] is not None
