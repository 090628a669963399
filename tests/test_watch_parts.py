"""The Watcher's parts, each on its own: fail open, the rules over a flush, the torch hooks,
the outputs and the snapshot bookkeeping (real engine, optimizer, scaler and store)."""

import logging
import math
import warnings

import pytest
import torch

from lrwatch._failopen import FailOpen
from lrwatch.distributed import RankContext
from lrwatch.errors import ConfigError
from lrwatch.judge import Judge, event_record
from lrwatch.outputs import Outputs, run_info
from lrwatch.recovery.keeper import SnapshotKeeper
from lrwatch.recovery.policy import RecoveryConfig, RecoveryPolicy
from lrwatch.rules import Engine, load_pack
from lrwatch.samples import Sample
from lrwatch.step_path import StepHooks


def test_fail_open_counts_every_failure_and_warns_once(caplog):
    counted = []
    faults = FailOpen(lambda: counted.append(1))

    def broken() -> None:
        raise OSError("disk full")

    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        faults.guard(broken)
        faults.guard(broken)   # the same kind within a minute: counted, not logged again
    assert len(counted) == 2
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "internal error while" in said[0] and "disk full" in said[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        faults.warn_once("bad:loss", "bad loss")
        faults.warn_once("bad:loss", "bad loss")
    assert [str(w.message) for w in seen] == ["bad loss"] and len(counted) == 4


def _samples(losses):
    return [Sample(step=i + 1, time=float(i), values={"loss": v, "lr": 0.1})
            for i, v in enumerate(losses)]


def test_judge_records_events_in_the_samples_and_tells_each_judged_step():
    engine = Engine(load_pack("training"))
    states, judged, errors = [], [], []
    judge = Judge(engine, set_rule_state=lambda *a: states.append(a), on_judged=judged.append,
                  on_error=errors.append)
    out, events = judge(_samples([1.0, 0.9, float("nan"), 0.8]))
    assert [s.step for s in out] == [1, 2, 3, 4] and judged == [1, 2, 3, 4] and not errors
    assert [(e.kind, e.rule, e.step) for e in events] == [("firing", "nonfinite", 3),
                                                          ("resolved", "nonfinite", 4)]
    assert out[2].events == ({"type": "firing", "rule": "nonfinite", "severity": "critical",
                              "step": 3, "value": "nan", "actions": ["rollback"],
                              "message": "loss is nan at step 3"},)
    assert out[3].events[0]["type"] == "resolved" and not out[0].events
    assert states == [("nonfinite", "critical", True), ("nonfinite", "critical", False)]


def test_event_record_writes_non_finite_values_as_strings():
    class E:   # the fields of an engine event the trace keeps
        kind, rule, severity, step = "firing", "nonfinite", "critical", 7
        value, actions, message = math.inf, ("rollback",), "loss is inf"

    rec = event_record(E())
    assert rec == {"type": "firing", "rule": "nonfinite", "severity": "critical", "step": 7,
                   "value": "inf", "actions": ["rollback"], "message": "loss is inf"}
    E.kind = "resolved"
    assert event_record(E()) == {"type": "resolved", "rule": "nonfinite",
                                 "severity": "critical", "step": 7}


def test_step_hooks_call_back_and_remove_gives_the_scaler_its_update_back():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    calls = []
    hooks = StepHooks(opt, scaler, pre=lambda *a: calls.append("pre"),
                      post=lambda *a: calls.append("post"),
                      before_update=lambda: calls.append("update"))
    assert "update" in vars(scaler)

    def step() -> None:
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()

    step()
    assert calls == ["pre", "post", "update"]
    hooks.remove()
    assert "update" not in vars(scaler)
    step()
    assert calls == ["pre", "post", "update"]


def test_outputs_check_listeners_and_close_the_trace(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = Outputs(registry=None, port=None, host="127.0.0.1", trace=tmp_path / "run.jsonl",
                  pushgateway=None, info=run_info("r", model, opt, None), layers=None,
                  dist=RankContext(None), export="rank0")
    with pytest.raises(ConfigError, match="listener must be callable"):
        out.add_listener(42)   # type: ignore[arg-type]
    got = []
    out.add_listener(got.append)
    samples = _samples([1.0, 2.0])
    out.emit(samples, lambda fn, *a: fn(*a))
    out.close(lambda fn, *a: fn(*a))
    assert got == samples and out.server is None
    assert len((tmp_path / "run.jsonl").read_text().splitlines()) >= 2


def test_snapshot_keeper_ties_each_snapshot_to_the_engine_state_of_its_step():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(load_pack("training"))
    rc = RecoveryConfig.coerce({"min_interval": 2, "max_interval": 2, "good_after": 1})
    policy = RecoveryPolicy(rc)
    keeper = SnapshotKeeper(rc, engine=engine, policy=policy, model=model, optimizer=opt,
                            scheduler=None, scaler=None, on_error=lambda: None,
                            deferred_schedule=False)
    keeper.take_first(0, 0)
    first = keeper.store.snapshots[0]
    assert first.pinned and first.good and first.extra["engine_state"] is not None
    assert first.extra["lr_scale"] == policy.lr_scale
    step = next(s for s in range(1, 10) if keeper.store.due(s))
    keeper.take_due(step, step)   # before the flush judged the step: it waits
    snap = keeper.store.snapshots[-1]
    assert snap.step == step and "engine_state" not in snap.extra
    for s in _samples([1.0] * step):
        engine.update(s)
        keeper.judged(s.step)
    assert snap.extra["engine_state"] is not None
    assert keeper.took_seconds() >= 0.0 and keeper.took_seconds() == 0.0


def test_sparse_gradients_are_measured_and_a_nan_one_is_held_back():
    """``nn.Embedding(sparse=True)`` with ``SparseAdam``: the fused norm kernel does not take
    sparse gradients (it raised, so no step had a gradient norm and the guard never saw a NaN
    batch, which went into the embedding rows it touched)."""
    import lrwatch
    from lrwatch.probe import tensor_norms

    g = torch.sparse_coo_tensor([[0, 2, 0]], [3.0, 4.0, 1.0], (5,),   # index 0 twice: 4
                                check_invariants=True)
    dense = torch.tensor([1.0, 2.0, 2.0])
    assert [float(n) for n in tensor_norms([g, dense])] == [pytest.approx(5.6568542), 3.0]

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    samples = []
    w = lrwatch.Watcher(emb, opt, listeners=[samples.append], recovery={"start_check": "off"})
    for step in range(1, 31):
        idx = torch.randint(0, 50, (16, 3), generator=gen)
        loss = emb(idx).pow(2).mean() * (float("nan") if step == 20 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    assert w.registry.get_sample_value("lrwatch_internal_errors_total") == 0
    assert all("grad_norm" in s.values for s in samples)
    assert [s.step for s in samples if s.values.get("grad_dropped", 0) >= 0.5] == [20]
    assert torch.isfinite(emb.weight).all()


def test_a_closure_optimizer_is_measured_after_its_step_and_never_guarded(caplog):
    """LBFGS computes its gradients inside ``step(closure)``: measured before the step they
    were the previous step's (step 1 read 0), the guard held back gradients the closure then
    recomputed (a healthy step "not applied", the NaN one applied), and the start check's
    shadow stepped without a closure (an internal error). Now: measured after the step, the
    guard and the start check off, said once."""
    import lrwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
               for _ in range(20)]
    batches[14] = (batches[14][0], batches[14][1] * float("nan"))   # step 15

    def mse(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    samples = []
    with caplog.at_level(logging.INFO, logger="lrwatch"):
        w = lrwatch.Watcher(model, opt, probe_loss=mse, listeners=[samples.append],
                            recovery={"lr_recover": False})
        for b in w.batches(batches):
            def closure():
                opt.zero_grad()
                loss = mse(model, b)
                loss.backward()
                return loss
            w.log(loss=opt.step(closure))
        w.close()
    assert "computes its gradients inside step(closure)" in caplog.text
    assert "not applied" not in caplog.text and "internal error" not in caplog.text
    assert w.registry.get_sample_value("lrwatch_internal_errors_total") == 0
    by = {s.step: s.values for s in samples}
    assert by[1]["grad_norm"] > 0                              # this step's, not nothing
    assert math.isnan(by[15]["grad_norm"]) and math.isfinite(by[14]["grad_norm"])
    assert w.recorder.guard is None and w.policy.state.start_checked


def test_a_restore_keeps_param_group_keys_added_after_the_snapshot():
    """Lightning's StochasticWeightAveraging adds ``swa_lr`` to the groups mid-run; a restart
    to a snapshot from before it dropped the key and SWALR raised KeyError at its next step."""
    from lrwatch.actions.snapshot import capture_state, restore_state

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = capture_state(model, opt)
    for g in opt.param_groups:
        g["swa_lr"] = 0.05
        g["lr"] = 20.0
    restore_state(state, model, opt)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["swa_lr"] == 0.05
