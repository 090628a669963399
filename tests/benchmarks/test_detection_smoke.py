"""Smoke test of the detection benchmark's harness on a few tiny real runs of the family suite.

Structural checks (labels consistent, a diverging run really reaches a non-finite value, a fault
is a real intervention into an otherwise identical run, the leave-one-family-out selection never
looks at the held-out family, scoring produces every measure); the benchmark's numbers are not
asserted here.
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
from benchmarks import family_runs as fr  # noqa: E402
from benchmarks import lofo  # noqa: E402
from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.samples import Sample  # noqa: E402

HEALTHY = fr.RunSpec("synth_ae", "adam", "constant", 1.0, seed=0)
DIVERGED = fr.RunSpec("diabetes_mlp", "sgd", "constant", 30.0, seed=0)
SPIKE = fr.RunSpec("synth_ae", "adam", "constant", 1.0, seed=0, fault="spike", onset=60,
                   base=fr.run_id(HEALTHY))
EVAL_DROP = fr.RunSpec("cancer_mlp", "adam", "constant", 1.0, seed=0, fault="eval_drop",
                       onset=100)


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> bench.Suite:
    cache = tmp_path_factory.mktemp("detection")
    scenarios = []
    for spec in (HEALTHY, DIVERGED, SPIKE):
        path = cache / f"{fr.run_id(spec)}.trace.jsonl"
        fr.record_run(spec, path)
        samples = read_trace(path)
        label = (fr.label_natural(samples) if spec.fault is None
                 else fr.label_faulted(samples, spec))
        scenarios.append(bench.Scenario(fr.run_id(spec), spec, path, label))
    return bench.Suite(cache, scenarios, [])


def _by_kind(suite: bench.Suite, kind: str) -> bench.Scenario:
    return next(sc for sc in suite.scenarios if sc.kind == kind)


def test_labels_are_consistent(tiny_suite: bench.Suite) -> None:
    kinds = sorted(sc.kind for sc in tiny_suite.scenarios)
    assert kinds == ["healthy", "natural_divergence", "spike"]
    for sc in tiny_suite.scenarios:
        samples = sc.samples()
        nf = fr.dr.first_nonfinite_step(samples)
        assert sc.label["first_nonfinite"] == nf
        assert [s.step for s in samples] == list(range(1, len(samples) + 1))
        if sc.kind == "healthy":
            assert sc.label["onset"] is None and nf is None
        else:
            assert sc.is_fault and 1 <= sc.label["onset"] <= samples[-1].step
            if nf is not None:
                assert sc.label["onset"] <= nf


def test_diverged_run_really_reaches_nonfinite(tiny_suite: bench.Suite) -> None:
    sc = _by_kind(tiny_suite, "natural_divergence")
    samples = sc.samples()
    nf = sc.label["first_nonfinite"]
    assert nf is not None
    bad = next(s for s in samples if s.step == nf)
    assert any(not math.isfinite(v) for v in bad.values.values())
    assert samples[-1].step == nf + fr.NONFINITE_TAIL
    assert any(tok in sc.path.read_text() for tok in ('"nan"', '"inf"'))


def test_fault_is_an_intervention_into_the_identical_base_run(tiny_suite: bench.Suite) -> None:
    base = _by_kind(tiny_suite, "healthy")
    fault = _by_kind(tiny_suite, "spike")
    onset = fault.label["onset"]
    a = {s.step: s.values for s in base.samples()}
    b = {s.step: s.values for s in fault.samples()}
    assert all(a[t] == b[t] for t in range(1, onset))           # same run before the onset
    assert b[onset]["loss"] != a[onset]["loss"]                  # corrupted batch at the onset


def test_eval_drop_leaves_training_untouched(tmp_path: Path) -> None:
    base = fr.RunSpec(EVAL_DROP.task, "adam", "constant", 1.0, seed=0)
    fr.record_run(base, tmp_path / "a.jsonl")
    fr.record_run(EVAL_DROP, tmp_path / "b.jsonl")
    a, b = read_trace(tmp_path / "a.jsonl"), read_trace(tmp_path / "b.jsonl")
    for x, y in zip(a, b):
        assert x.values["loss"] == y.values["loss"]              # training is identical
        if "eval_accuracy" in x.values:
            if x.step < EVAL_DROP.onset:
                assert x.values["eval_accuracy"] == y.values["eval_accuracy"]
            else:                                                # the evaluation degrades
                assert y.values["eval_accuracy"] < x.values["eval_accuracy"]


def test_recording_is_deterministic(tmp_path: Path) -> None:
    spec = fr.RunSpec("cancer_mlp", "adamw", "cosine", 3.0, seed=3, batch_mult=0.5)
    fr.record_run(spec, tmp_path / "a.jsonl")
    fr.record_run(spec, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_anchors_fire_on_an_obvious_nan() -> None:
    stream = [Sample(step=t, values={"loss": 1.0 + 0.01 * (t % 3), "grad_norm": 1.0,
                                     "eval_loss": 1.0 - 0.001 * t})
              for t in range(1, 150)]
    stream.append(Sample(step=150, values={"loss": math.nan, "grad_norm": math.nan,
                                           "eval_loss": math.nan}))
    for key, anchor in anchors.make_anchors().items():
        fired = [s.step for s in stream if anchor.update(s)]
        if key == "keras_terminate_on_nan":
            assert fired == [150]


def test_scoring_and_lofo_structure(tiny_suite: bench.Suite) -> None:
    det = bench.lrwatch_detector(lofo.ruleset_for(lofo.pack_doc(None), {}), "lrwatch")
    rows = bench.score_firings(tiny_suite, det, bench.replay_all(tiny_suite, det.run))
    agg = bench.aggregate(rows)
    assert agg["faults"] == 2 and agg["healthy"] == 1 and agg["nonfinite_runs"] == 1
    # the non-finite run is caught by a critical rule, and warned before its first NaN
    div = next(r for sc, r in rows if sc.kind == "natural_divergence")
    assert div["caught"] and div["warned_before_nonfinite"]
    table = bench.format_table([("lrwatch", agg)])
    assert "FA healthy" in table and "warned healthy" in table
    # a choice made without a family never depends on that family's rows
    fams = sorted({sc.family for sc in tiny_suite.scenarios})
    good = bench.score_firings(tiny_suite, det, {sc.id: [] for sc in tiny_suite.scenarios})
    noisy = [(sc, {**r, "false_alarm": True}) if sc.family == fams[0] else (sc, r)
             for sc, r in good]
    by_cfg = {(("a", 1),): good, (("a", 2),): noisy}
    assert lofo._choose(by_cfg, fams[1:]) == (("a", 1),)      # tie: first is kept
    assert lofo._choose({(("a", 2),): noisy, (("a", 1),): good}, fams[1:]) == (("a", 2),)
    assert lofo._choose({(("a", 2),): noisy, (("a", 1),): good}, fams) == (("a", 1),)


def test_blowup_ramp_stops_before_the_optimizer_overflows() -> None:
    # a loss that cannot overflow (bounded) would let the x3-per-step ramp reach a rate that
    # overflows inside the optimizer; the ramp stops at BLOWUP_MAX_LR
    spec = fr.RunSpec("synth_ae", "rmsprop", "constant", 1.0, seed=0, fault="blowup", onset=1,
                      base=fr.run_id(HEALTHY))
    rec = fr._Recorder(spec)
    for step in range(1, 200):
        rec.intervene(step)
    lrs = [g["lr"] for g in rec.opt.param_groups]
    assert all(math.isfinite(lr) and lr < fr.BLOWUP_MAX_LR * fr.BLOWUP_FACTOR for lr in lrs)
    assert max(lrs) >= fr.BLOWUP_MAX_LR
