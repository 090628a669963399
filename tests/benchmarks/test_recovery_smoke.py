"""Smoke test of ``benchmarks/recovery.py``: it runs, and its output has the documented shape.

Structure only (one task, one candidate, one overhead round): the benchmark's numbers -- shares
of runs that finish healthy, overhead ratios -- belong in ``docs/recovery.md``, not in a test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import recovery as bench  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """As the benchmark runs: OpenMP threads waiting on a busy core make tiny steps very slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smoke_run_writes_tables_and_json(tmp_path: Path) -> None:
    out = tmp_path / "recovery.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--smoke",
                           "-q", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for heading in ("### Healthy references", "### Configurations whose bare run diverged",
                    "### Summary", "### Overhead on healthy runs"):
        assert heading in proc.stdout
    assert "| **lrwatch, defaults** |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "recovery"
    assert report["config"]["recovery"] == {**report["config"]["recovery"], "lr_factor": 0.5,
                                            "max_rollbacks": 5}   # the headline uses defaults
    (ref,) = report["references"].values()
    assert ref["task"] == "digits_mlp" and ref["metric"] == "accuracy"
    assert 0.0 < ref["reference"] <= 1.0
    assert len(ref["reference_seed_scores"]) == len(bench.REF_SEEDS)
    sweep = report["config"]["reference_sweep"]
    assert len(ref["runs"]) == len(sweep["optimizers"]) * len(sweep["mults"])

    (cfg,) = report["configs"]
    s = report["summary"]
    assert s["candidates"] == 1 and s["diverged"] == int(cfg["diverged"])
    for anchor in ("nan_stop", "spike_stop"):
        assert anchor in cfg["bare"]["anchors"]
    if cfg["diverged"]:
        lw = cfg["lrwatch"]
        assert lw["executed_steps"] <= bench.STEP_CAP * ref["steps"]
        assert lw["rollbacks"] == sum(a["type"] == "rollback" for a in lw["actions"])
        assert set(s["healthy"]) >= {"bare", "nan_stop", "spike_stop", "lrwatch"}
        assert "lrwatch_extra" in cfg    # the clearly labelled non-default column

    (ov,) = report["overhead"]
    assert list(ov["variants"]) == [k for k, v in bench.OVERHEAD_VARIANTS.items() if v is not None]
    for v in ov["variants"].values():
        for clock in ("cpu", "wall"):
            assert isinstance(v[clock]["ratio"], float) and v[clock]["ratio"] > 0
        assert v["internal_errors"] == 0
        assert v["target"] is None       # the tiny model carries no target


def test_bare_and_lrwatch_runs_agree_until_lrwatch_acts() -> None:
    """A healthy run is numerically the same with and without the Watcher (it only reads)."""
    cfg = bench.Config("digits_mlp", "adam", "warmup", 2e-3, seed=0)
    bare = bench.run_bare(cfg, anchors=False)
    lw = bench.run_lrwatch(cfg)
    if lw["rollbacks"] == 0:
        assert lw["final"]["score"] == pytest.approx(bare["final"]["score"], abs=1e-6)
        assert lw["executed_steps"] == bench.get_problem("digits_mlp").steps
    assert not bench.diverged(bare, bare["final"]["score"])[0]


def test_a_real_divergence_is_selected_and_faults_are_injected() -> None:
    """The selection criterion on a run that really overflows, and an LR fault that is real."""
    boom = bench.Config("synth_reg_mlp", "sgd", "constant", 5.0, seed=2)
    bare = bench.run_bare(boom)
    assert bare["first_nonfinite"] is not None
    assert bench.diverged(bare, 0.99)[0]
    assert bare["anchors"]["nan_stop"]["stop_step"] == bare["first_nonfinite"]
    assert not math.isfinite(bare["final"]["score"])

    ref = bench.get_problem("digits_mlp").base_lr["momentum"]
    cfg = bench.Config("digits_mlp", "momentum", "warmup", ref, 0, "lr_bug", 5, 100.0)
    sched = bench._schedule(cfg, 400)
    assert sched(5) == pytest.approx(100.0 * bench.dr._schedule_fn("warmup", 400)(5))
    assert sched(4) == pytest.approx(bench.dr._schedule_fn("warmup", 400)(4))


def test_family_tables_show_the_comparison_arm_and_the_tuned_runs() -> None:
    arm = {"value": 0.7, "ok": False, "rollbacks": 0, "probes": 0, "probe_steps": 0,
           "exit_status": 0, "lr_scale": 1.0}
    row = {"task": "t", "family": "mlp_clf", "opt": "adam", "mult": 3.0, "seed": 0,
           "diverged": True, "bare": 0.5, "fixed": arm, "measured": arm, "guard_off": arm,
           "no_cut": {**arm, "value": 0.8, "ok": True, "lr_scale": 0.25}}
    tuned = {"task": "t", "family": "mlp_clf", "opt": "adam", "seed": 0, "bare": 0.8,
             "bare_ok": True, "fixed": {"value": 0.8, "ok": True, "lr_scale": 1.0},
             "no_cut": {"value": 0.79, "ok": True, "lr_scale": 0.5}}
    fault = {"task": "t", "family": "mlp_clf", "opt": "adam", "fault": "nan_batch", "seed": 0,
             "clean": 0.8, "value": 0.8, "bare": 0.1, "ok": True, "watched": 0.8,
             "ok_watched": True, "bare_ok": False, "ok_guard_off": True, "ok_replay": True,
             "ok_no_cut": False}
    text = bench.fam_tables({"rows": [row], "tuned": [tuned], "faults": [fault]})
    assert "| no stall cut (otherwise the defaults) |" in text
    assert "| **all** | 1 | 0/1 (0%) | 0/1 (0%) | 0/1 | 1/1 |" in text
    assert "| **all** | 1 | 1/1 | 1/1 (cut 0) | 1/1 (cut 1) |" in text
    assert "| nan_batch | 1 | 1/1 (100%) | 1/1 (100%) | 0/1 | 1/1 | 1/1 | 0/1 |" in text


def test_family_tables_split_the_would_diverge_runs_by_how_the_bare_run_failed() -> None:
    arm = {"value": 0.7, "ok": False, "rollbacks": 0, "probes": 0, "probe_steps": 0,
           "exit_status": 0, "lr_scale": 1.0}
    ok = {**arm, "ok": True}
    rows = [{"task": "t", "family": "mlp_clf", "opt": "adam", "mult": m, "seed": 0,
             "diverged": True, "bare": 0.5, "fixed": f, "measured": arm, "guard_off": arm,
             "no_cut": f, "bare_label": {"label": lab, "kind": kind, "outcome": oc}}
            for m, f, lab, kind, oc in [(30.0, ok, "diverged", "never_learned", "diverged"),
                                        (10.0, arm, "diverged", None, "diverged"),
                                        (3.0, ok, "healthy", None, "learned")]]
    text = bench.fam_tables({"rows": rows, "tuned": [], "faults": []})
    assert "| diverged | 2 | 1/2 | 0/2 | 0/2 | 1/2 |" in text
    assert "| learned | 1 | 1/1 | 0/1 | 0/1 | 1/1 |" in text
    assert "| ambiguous |" not in text
    assert "| never_learned | ✓ 0.7000 |" in text


def test_a_bare_family_run_is_labelled_from_its_own_curve(tmp_path, monkeypatch) -> None:
    """A run at 30x its tuned rate that blows up is labelled diverged by the detection suite's
    labeller; the tuned run is labelled healthy; faulted runs are not labelled."""
    monkeypatch.setattr(bench, "FAM_CACHE", tmp_path)
    tuned = bench.fam_run("friedman_mlp", "momentum", 1.0, 0)
    assert tuned["label"]["outcome"] == "learned", tuned["label"]
    hot = bench.fam_run("friedman_mlp", "momentum", 300.0, 0)
    assert hot["label"]["outcome"] == "diverged", hot["label"]
    faulted = bench.fam_run("friedman_mlp", "momentum", 1.0, 0, fault="nan_batch")
    assert "label" not in faulted


def test_the_restart_ceiling_is_the_tuned_run_with_the_budget_that_was_left() -> None:
    from benchmarks import families as fam

    task = fam.TASKS["synth_clf_mlp"]
    tuned = {"evals": [[20, 0.5], [100, 0.7], [200, 0.78], [300, 0.8]]}
    ref = {"median": 0.8, "untrained": 1.4}
    late = bench.fam_restart_ceiling(task, tuned, {"at": 150, "to": 0, "restart": True}, ref)
    assert late == {"at": 150, "left": 150, "value": 0.7, "ok": False}
    early = bench.fam_restart_ceiling(task, tuned, {"at": 90, "to": 0, "restart": True}, ref)
    assert early["value"] == 0.78 and early["ok"]
    assert bench.fam_restart_ceiling(task, tuned, {"at": 90, "to": 80, "restart": False},
                                     ref) is None
    assert bench.fam_restart_ceiling(task, tuned, None, ref) is None
    at_end = bench.fam_restart_ceiling(task, tuned, {"at": 290, "to": 0, "restart": True}, ref)
    assert at_end == {"at": 290, "left": 10, "value": None, "ok": False}
    arm = {"value": 0.7, "ok": False, "rollbacks": 1, "probes": 0, "probe_steps": 0,
           "exit_status": 0, "lr_scale": 0.1, "first_action": {"at": 290}}
    row = {"task": "synth_clf_mlp", "family": "mlp_clf", "opt": "adam", "mult": 30.0,
           "seed": 0, "diverged": True, "bare": 0.3, "fixed": arm, "measured": arm,
           "guard_off": arm, "no_cut": arm, "restart_ceiling": at_end,
           "bare_label": {"label": "diverged", "kind": None, "outcome": "diverged"}}
    text = bench.fam_tables({"rows": [row], "tuned": [], "faults": []})
    assert "restarted after 290 steps, ceiling none (no evaluation in the steps left)" in text


def test_a_candidate_rule_file_replaces_the_default_pack_in_every_arm(monkeypatch) -> None:
    assert bench._arm_rules(None) == "training"
    monkeypatch.setattr(bench, "FAM_RULES", "cand.yml")
    assert bench._arm_rules(None) == "cand.yml"
    assert bench._arm_rules(("training", "plateau_cut")) == ["cand.yml", "plateau_cut"]
    assert bench._arm_rules("other.yml") == "other.yml"


def test_a_longer_budget_trains_every_run_that_many_times_longer(tmp_path, monkeypatch) -> None:
    """``--budget K``: K x the task's steps, a separate cache entry, the fault at the same
    share of the run; a budget below 1 is refused with a message."""
    from benchmarks import families as fam

    monkeypatch.setattr(bench, "FAM_CACHE", tmp_path)
    task = fam.TASKS["friedman_mlp"]
    one = bench.fam_run("friedman_mlp", "momentum", 1.0, 0)
    monkeypatch.setattr(bench, "FAM_BUDGET", 2)
    two = bench.fam_run("friedman_mlp", "momentum", 1.0, 0)
    assert (one["steps"], two["steps"]) == (task.steps, 2 * task.steps)
    assert len(list(tmp_path.iterdir())) == 2
    assert bench.fam_steps(task) == 2 * task.steps
    with pytest.raises(SystemExit):
        bench.fam_main(["--families", "--budget", "0"])


def test_a_regression_is_selected_by_the_same_band_its_arms_are_scored_by() -> None:
    """The band of a regression (5% of the range from the healthy median to the untrained
    loss) comes from the reference's untrained loss for the selection too: the Friedman run
    at 3x on seed 1 (its own untrained loss 1.129, the reference's 0.971) ends at 0.1253,
    outside the reference's band (0.124) though inside its own (0.132)."""
    from benchmarks import families as fam

    task = fam.TASKS["friedman_mlp"]
    bare = {"finite": True, "final": {"loss": 0.1253, "acc": math.nan},
            "untrained": {"loss": 1.129, "acc": math.nan}}
    assert bench.fam_bare_diverged(task, bare, 0.0794, 0.971)
    assert not bench.fam_close(task, 0.1253, 0.0794, 0.971, 2.0)     # how an arm is scored
    assert not bench.fam_bare_diverged(task, bare, 0.0794, 1.129)


def test_a_classifier_without_accuracy_is_an_error_not_a_nan() -> None:
    from types import SimpleNamespace

    run = {"finite": True, "final": {"loss": 0.4, "acc": math.nan}}
    with pytest.raises(ValueError, match="reports no accuracy"):
        bench.fam_value(SimpleNamespace(name="w2v", classification=True), run)
    assert bench.fam_value(SimpleNamespace(name="reg", classification=False), run) == 0.4
    assert math.isnan(bench.fam_value(SimpleNamespace(name="reg", classification=False),
                                      {"finite": False, "final": {}}))


def test_a_poisoned_batch_a_task_cannot_take_names_the_task_and_the_fix() -> None:
    """Blind set AM's Poincare embedding keeps node ids in a float input: the poisoned batch
    (x 1000) stopped the benchmark with a bare IndexError from inside the model."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from benchmarks import families as fam

    table = nn.Embedding(10, 3)

    def model(x: torch.Tensor) -> torch.Tensor:
        return table(x.long()).sum(-1)

    task = SimpleNamespace(name="ids_as_floats",
                           loss=lambda out, y: ((out - y) ** 2).mean())
    xb, yb = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    assert bench._fam_loss(task, model, xb, yb, poisoned=False).ndim == 0
    data = fam.Data.__new__(fam.Data)
    data.n_classes = 0
    px, py = bench._fam_fault("poisoned_batch", data, xb, yb)
    assert torch.equal(px, xb * 1e3)
    with pytest.raises(SystemExit, match="task ids_as_floats: .*poison"):
        bench._fam_loss(task, model, px, py, poisoned=True)

    class KeepIds(fam.Data):           # the fix the message names
        def poison(self, xb, yb):
            return xb, yb * 1e3
    keep = KeepIds.__new__(KeepIds)
    px, py = bench._fam_fault("poisoned_batch", keep, xb, yb)
    assert torch.equal(px, xb)
    assert bench._fam_loss(task, model, px, py, poisoned=True).ndim == 0
