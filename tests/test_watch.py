"""The training Watcher: probe maths, the no-host-sync guarantee, AMP, parameter groups."""

from __future__ import annotations

import math
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from lrwatch.samples import Sample


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_grad_norm_equals_get_total_norm_and_update_ratio_is_exact() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    got: list[Sample] = []
    refs: list[tuple[float, float]] = []
    with lrwatch.Watcher(model, opt, flush_every=3, update_ratio=True, update_ratio_every=1,
                         listeners=[got.append]) as w:
        for i in range(7):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            ref_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            delta = math.sqrt(sum(float(((p.detach() - b) ** 2).sum())
                                  for p, b in zip(model.parameters(), before)))
            theta = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
            refs.append((float(ref_norm), delta / theta))
            w.log(loss=loss)
    assert [s.step for s in got] == list(range(1, 8))
    for s, (ref_norm, ref_ratio) in zip(got, refs):
        assert s.values["grad_norm"] == pytest.approx(ref_norm, rel=1e-6)
        assert s.values["update_ratio"] == pytest.approx(ref_ratio, rel=1e-4)
        assert s.values["nonfinite_grad"] == 0.0
        assert s.values["momentum/0"] == 0.9


def test_mixed_dtype_parameters_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    got: list[Sample] = []
    with lrwatch.Watcher(model, opt, listeners=[got.append]) as w:
        x = torch.randn(5, 4)
        out = model[1](model[0](x).double())
        out.sum().backward()
        ref = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        w.log(loss=out.sum().float())
    assert got[0].values["grad_norm"] == pytest.approx(float(ref), rel=1e-6)


def test_param_groups_and_schedulers_per_group_lr() -> None:
    model = _mlp()
    opt = torch.optim.Adam([
        {"params": model[0].parameters(), "lr": 1e-2},
        {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 1e-3,
         "betas": (0.8, 0.99)},
    ])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    got: list[Sample] = []
    expected: list[tuple[float, float]] = []
    with lrwatch.Watcher(model, opt, sched, flush_every=4, listeners=[got.append],
                         per_layer=True) as w:
        for i in range(6):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            expected.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
            opt.step()
            sched.step()
            w.log(loss=loss)
    # The learning rate recorded for a step is the one that step used.
    assert [s.lr_groups for s in got] == expected
    assert expected[0] == (1e-2, 1e-3) and expected[2] == (5e-3, 5e-4)
    assert got[0].values["momentum/0"] == 0.9 and got[0].values["momentum/1"] == 0.8
    # Per-layer norms: bounded labels (top-level modules), and they add up to the global norm.
    layer_keys = sorted(k for k in got[0].values if k.startswith("grad_norm/"))
    assert layer_keys == ["grad_norm/0", "grad_norm/2", "grad_norm/4"]
    for s in got:
        total = math.sqrt(sum(s.values[k] ** 2 for k in layer_keys))
        assert total == pytest.approx(s.values["grad_norm"], rel=1e-5)


def test_amp_grad_scaler_unscaled_norm_and_skipped_overflow_step() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got: list[Sample] = []
    refs: list[float] = []
    with lrwatch.Watcher(model, opt, scaler=scaler, flush_every=2, listeners=[got.append]) as w:
        for i in range(4):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if i == 2:  # an overflow: the scaler must skip this step
                loss = loss * torch.tensor(float("inf"))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            refs.append(float(torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters()])))
            scaler.step(opt)
            scaler.update()
            w.log(loss=loss)
    assert [s.step for s in got] == [1, 2, 3, 4]
    assert got[0].values["grad_norm"] == pytest.approx(refs[0], rel=1e-6)  # unscaled
    assert got[0].values["loss_scale"] == 1024.0
    bad = got[2]
    assert bad.values["skipped"] == 1.0 and bad.values["nonfinite_grad"] == 1.0
    assert bad.values["nonfinite_loss"] == 1.0
    assert got[3].values["loss_scale"] == 512.0  # the scaler backed off after the overflow
    assert got[3].values["nonfinite_grad"] == 0.0


def test_log_before_or_after_step_lands_on_the_same_step() -> None:
    for log_first in (True, False):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        got: list[Sample] = []
        losses = []
        with lrwatch.Watcher(model, opt, flush_every=5, listeners=[got.append]) as w:
            for i in range(5):
                x, y = _batch(i)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                losses.append(float(loss.detach()))
                if log_first:
                    w.log(loss=loss, accuracy=0.5)
                opt.step()
                if not log_first:
                    w.log(loss=loss, accuracy=0.5)
        assert [s.values["loss"] for s in got] == pytest.approx(losses)
        assert all(s.values["accuracy"] == 0.5 for s in got)


_HOST_CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__",
                     "__index__")


_LRWATCH_DIR = os.path.dirname(lrwatch.__file__)


def _called_from_lrwatch() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_LRWATCH_DIR):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@contextmanager
def _count_host_conversions(only_lrwatch: bool) -> Iterator[dict[str, int]]:
    """Count tensor-to-host conversions; with ``only_lrwatch``, those lrwatch's code makes.

    torch's own optimizers call ``.item()`` on their step counters on the CPU, which is theirs
    to answer for, not ours.
    """
    counts = {name: 0 for name in _HOST_CONVERSIONS}
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_CONVERSIONS}

    def wrap(name: str):  # type: ignore[no-untyped-def]
        orig = originals[name]

        def counted(self, *a, **k):  # type: ignore[no-untyped-def]
            if not only_lrwatch or _called_from_lrwatch():
                counts[name] += 1
            return orig(self, *a, **k)
        return counted

    for name in _HOST_CONVERSIONS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def test_update_ratio_every_k_steps_is_exact_on_those_steps() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    got: list[Sample] = []
    refs: dict[int, float] = {}
    with lrwatch.Watcher(model, opt, flush_every=4, update_ratio=True, update_ratio_every=3,
                         listeners=[got.append]) as w:
        for i in range(1, 11):
            x, y = _batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            delta = math.sqrt(sum(float(((p.detach() - b) ** 2).sum())
                                  for p, b in zip(model.parameters(), before)))
            theta = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
            refs[i] = delta / theta
            w.log()
    measured = {s.step: s.values["update_ratio"] for s in got if "update_ratio" in s.values}
    assert sorted(measured) == [3, 6, 9]
    for step, ratio in measured.items():
        assert ratio == pytest.approx(refs[step], rel=1e-4)
    with pytest.raises(ConfigError, match="update_ratio_every"):
        lrwatch.Watcher(model, opt, update_ratio=True, update_ratio_every=0)


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
@pytest.mark.parametrize("guard", ["off", "auto"])
def test_no_tensor_to_host_conversion_between_flushes(opt_name: str, guard: str) -> None:
    # guard="off" is the path a non-fused optimizer on a GPU takes (no host conversion
    # between flushes); on the CPU the default guard reads its verdict on the host, one
    # conversion per step, which waits for nothing there
    model = _mlp()
    if opt_name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    batches = [_batch(i) for i in range(10)]
    w = lrwatch.Watcher(model, opt, sched, flush_every=5, per_layer=True, update_ratio=True,
                        update_ratio_every=1, recovery={"guard": guard})
    assert w.recorder.guard == (None if guard == "off" else "hold")
    per_step: list[int] = []
    # SGD makes no conversion of its own, so there every conversion in the loop is counted.
    with _count_host_conversions(only_lrwatch=opt_name != "SGD") as counts:
        for x, y in batches:
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            sched.step()
            w.log(loss=loss, accuracy=(out.argmax(1) == y).float().mean())
            per_step.append(sum(counts.values()))
    w.close()
    g = 0 if guard == "off" else 1     # the host verdict's conversions per step
    new = [b - a for a, b in zip([0] + per_step, per_step)]
    # Steps 1-4 and 6-9 convert nothing else; each flush (steps 5 and 10) makes one transfer.
    assert new[:4] == [g] * 4 and new[5:9] == [g] * 4
    assert 1 <= new[4] - g <= 2  # .cpu() (+ .tolist() on the already-host copy)
    assert new[9] == new[4]
    assert w.flushes == 2


@pytest.mark.parametrize("ratio", [100.0, "auto", 0.0])
def test_the_device_guard_converts_nothing_to_the_host(ratio: object) -> None:
    """The device guard (a fused optimizer's flag, or the gradient zeroed on a GPU) decides
    with tensor operations only, the threshold sized by the run's own spikes too
    (``guard_ratio="auto"``); run here on CPU tensors, the same code a GPU runs."""
    from lrwatch.probe import GradGuard

    g = GradGuard(torch.device("cpu"), ratio=ratio)  # type: ignore[arg-type]
    norms = [torch.tensor(v) for v in [1.0] * 25 + [15.0, 1.0, 40.0, float("nan"), 500.0]]
    with _count_host_conversions(only_lrwatch=False) as counts:
        verdicts = [g.bad(n) for n in norms]
    assert sum(counts.values()) == 0
    assert bool(verdicts[-2]) and (bool(verdicts[-1]) is (ratio != 0.0))


def test_trace_written_and_readable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    got: list[Sample] = []
    with lrwatch.Watcher(model, opt, trace=path, flush_every=4, listeners=[got.append]) as w:
        for i in range(10):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            w.log(loss=loss)
    back = read_trace(path)
    assert [s.step for s in back] == list(range(1, 11))
    for a, b in zip(got, back):
        assert a.values == pytest.approx(b.values)
        assert a.lr_groups == b.lr_groups


def test_nonfinite_loss_and_grads_are_flagged() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got: list[Sample] = []
    with lrwatch.Watcher(model, opt, listeners=[got.append]) as w:
        x, y = _batch(0)
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
    v = got[0].values
    assert math.isnan(v["loss"]) and math.isnan(v["grad_norm"])
    assert v["nonfinite_loss"] == 1.0 and v["nonfinite_grad"] == 1.0


def test_bad_arguments_are_clear() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="flush_every"):
        lrwatch.Watcher(model, opt, flush_every=0)
    with pytest.raises(ConfigError, match="optimizer"):
        lrwatch.Watcher(model, "adam")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="port"):
        lrwatch.Watcher(model, opt, port=70000)
    # a bool is an int to Python: port=True served on port 1, batch_size=True meant 1
    with pytest.raises(ConfigError, match="port"):
        lrwatch.Watcher(model, opt, port=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        lrwatch.Watcher(model, opt, batch_size=True)  # type: ignore[arg-type]


def _log_once(metrics: Any, **kw: Any) -> tuple[Any, list[Any]]:
    """One step of the MLP logged with ``metrics(loss)``; the closed Watcher and the warnings
    that ``log`` gave (they must point at the caller: this file)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, **kw)
    x, y = _batch(0)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.log(**metrics(loss))
    w.close()
    return w, list(caught)


def test_bad_logged_values_warn_count_and_do_not_crash() -> None:
    got: list[Sample] = []
    w, caught = _log_once(lambda loss: {"loss": loss, "vec": torch.ones(3), "name": "oops"},
                          listeners=[got.append])
    assert len(caught) == 2
    # the warnings point at the line that called log(), not inside lrwatch
    assert [c.filename for c in caught] == [__file__, __file__], [c.filename for c in caught]
    assert "loss" in got[0].values and "vec" not in got[0].values
    assert w.exporter.internal_errors._value.get() == 2


def test_a_metric_named_as_a_trace_key_is_refused_not_dropped_silently(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``log(step=...)`` (as wandb.log takes it), ``time=`` or ``events=`` went into the live
    sample, and vanished from the trace, whose own keys those are, with no word (fourteenth
    round's audit, docs/design.md). They are bad input now: warned about, counted, left out."""
    got: list[Sample] = []
    path = tmp_path / "run.jsonl"
    w, caught = _log_once(lambda loss: {"loss": loss, "step": 100, "time": 5.0, "events": 1.0},
                          trace=path, listeners=[got.append])
    messages = [str(c.message) for c in caught]
    assert len(messages) == 3 and all("a key of the trace's own" in m for m in messages)
    assert "log(my_step=...)" in messages[0]
    assert [c.filename for c in caught] == [__file__] * 3
    assert not {"step", "time", "events"} & set(got[0].values)
    assert got[0].values == pytest.approx(read_trace(path)[0].values)   # live equals trace
    assert w.exporter.internal_errors._value.get() == 3


def test_failing_listener_does_not_break_training() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []

    def broken(_: Sample) -> None:
        raise RuntimeError("listener bug")

    with lrwatch.Watcher(model, opt, listeners=[broken, lambda s: seen.append(s.step)],
                         flush_every=2) as w:
        for i in range(4):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert seen == [1, 2, 3, 4]
    assert w.exporter.internal_errors._value.get() == 4


def _train(w: "lrwatch.Watcher", steps: int, **metrics_at: "dict[int, float]") -> None:
    model, opt = w.model, w.optimizer
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        w.log(loss=loss, **{k: v.get(w.step, 0.0) for k, v in metrics_at.items()})


_SIGNAL_RULES = """
version: 1
rules:
  - name: signal_high
    metric: signal
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [alert]
"""


def test_rule_events_without_a_sender_are_logged_once_each_with_a_marker(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    import logging

    rules = tmp_path / "rules.yml"
    rules.write_text(_SIGNAL_RULES)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    caplog.set_level(logging.INFO, logger="lrwatch")
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=1, recovery=False)
    _train(w, 12, signal={5: 1.0, 6: 1.0})
    w.close()
    assert w.step == 12
    events = [r for r in caplog.records if getattr(r, "lrwatch_event", False)]
    lines = [r.getMessage() for r in events]
    assert len(lines) == 2, lines
    assert lines[0].startswith("lrwatch: signal_high (warning): ") and "resolved" not in lines[0]
    assert lines[1].count("resolved") == 1 and "firing" not in lines[1], lines[1]


def test_stop_is_reported_on_one_channel(tmp_path, caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]
                                         ) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "rules.yml"
    rules.write_text(_SIGNAL_RULES.replace("actions: [alert]", "actions: [stop]"))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=1)
    for b in w.batches(range(30)):
        _train(w, 1, signal={5: 1.0})
    w.close()
    assert w.should_stop and w.exit_status == 3 and w.step == 5
    stops = [r for r in caplog.records if "stopping the run" in r.getMessage()]
    assert len(stops) == 1 and getattr(stops[0], "lrwatch_event", False)
    assert "stopping the run" not in capsys.readouterr().err   # not printed a second time


def test_unusable_trace_is_counted_at_every_dropped_flush_and_training_goes_on(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is needed for a real disk-full error")
    full = tmp_path / "run.jsonl"
    os.symlink("/dev/full", full)            # every write: ENOSPC
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for trace in (full, blocked / "run.jsonl"):   # a full disk; a path that cannot be opened
        caplog.clear()
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        w = lrwatch.Watcher(model, opt, trace=trace, flush_every=2)   # does not raise
        _train(w, 10)
        w.flush()
        w.trace.flush()    # type: ignore[union-attr]
        w.close()
        assert w.step == 10
        failures = w.trace.failures   # type: ignore[union-attr]
        assert failures >= (2 if trace == full else 1)
        assert w.exporter.internal_errors._value.get() == failures
        warned = [r for r in caplog.records if "trace" in r.getMessage()]
        assert len(warned) == 1 and warned[0].exc_info is None, [r.getMessage() for r in warned]


def _loop_with_evaluations(log_first: bool, flush_lag: int, trace: Any = None,
                           counts: dict[str, int] | None = None) -> list[Sample]:
    """Eight steps, each logging its loss once (before or after ``opt.step()``); after the
    steps 3, 5 and 7 an evaluation is logged in a call of its own, before the next step.
    With ``counts``, the host conversions lrwatch makes in the evaluations' calls at steps 3
    and 7 (not flush steps: ``flush_every=5``) are added there."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got: list[Sample] = []
    with lrwatch.Watcher(model, opt, flush_every=5, flush_lag=flush_lag, rules=None,
                         trace=trace, listeners=[got.append], recovery={"guard": "off"}) as w:
        for i in range(1, 9):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if log_first:
                w.log(loss=loss)
            opt.step()
            if not log_first:
                w.log(loss=loss)
            if i in (3, 5, 7):
                value = torch.tensor(float(i))   # a tensor: kept on the device
                if counts is not None and i != 5:
                    with _count_host_conversions(only_lrwatch=True) as c:
                        w.log(eval_loss=value, eval_accuracy=i / 10)
                    counts["n"] = counts.get("n", 0) + sum(c.values())
                else:
                    w.log(eval_loss=value, eval_accuracy=i / 10)
    return got


@pytest.mark.parametrize("log_first", [False, True])
@pytest.mark.parametrize("flush_lag", [0, 1])
def test_a_second_log_call_in_a_step_joins_that_step(log_first: bool, flush_lag: int,
                                                     tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The loss logged, then an evaluation's values in a second ``log()`` after an evaluation
    pass: both go on the step's one sample and trace line (sixteenth round's audit: the
    second call's values went on the next step's line, and in a loop that logs before
    ``opt.step()`` they were lost, as was, after the step, the next step's loss). With
    ``flush_lag=1`` even the flush step's (its copy in flight) joins; with ``flush_lag=0``
    the flush step was judged at its first ``log()``: its evaluation goes with the next
    step, with a warning that says what to do. No host conversion in those calls."""
    path = tmp_path / "run.jsonl"
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _loop_with_evaluations(log_first, flush_lag, trace=path, counts=counts)
    assert [s.step for s in got] == list(range(1, 9))
    assert all("loss" in s.values for s in got)   # no step's loss lost
    late = flush_lag == 0   # the flush step 5 was judged before its evaluation was logged
    want = {3: 3.0, 6 if late else 5: 5.0, 7: 7.0}
    assert {s.step: s.values["eval_loss"] for s in got if "eval_loss" in s.values} == want
    assert {s.step: s.values["eval_accuracy"] for s in got
            if "eval_accuracy" in s.values} == pytest.approx({k: v / 10 for k, v in want.items()})
    assert [s.values for s in read_trace(path)] == [s.values for s in got]
    judged = [str(c.message) for c in caught if "was judged" in str(c.message)]
    assert len(judged) == (1 if late else 0), judged
    if late:
        assert "came after step 5" in judged[0] and "flush_lag=1" in judged[0]
    assert counts["n"] == 0   # the evaluation joins its step on the device


def _nan_run_with_evaluations(flush_lag: int, use_batches: bool, tmp_path: Any,
                              every: int = 1) -> tuple["lrwatch.Watcher", list[Sample], dict[int, float],
                                         list[str]]:
    """40 steps, each logging its loss after ``opt.step()`` and then an evaluation in a
    second call (every ``every``-th step); a NaN batch at step 26 (the guard off) rolls the run back. Returns the
    Watcher, the samples, each step's own loss as the loop saw it, and lrwatch's warnings."""
    from flag_rules import NONFINITE_ROLLBACK
    (tmp_path / "r.yml").write_text(NONFINITE_ROLLBACK)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    got: list[Sample] = []
    losses: dict[int, float] = {}
    w = lrwatch.Watcher(model, opt, rules=str(tmp_path / "r.yml"), flush_every=4,
                        flush_lag=flush_lag, listeners=[got.append],
                        recovery={"good_after": 5, "min_interval": 5, "max_interval": 5,
                                  "cooldown": 0, "replay": True, "start_check": "off",
                                  "guard": "off"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in (w.batches(range(40)) if use_batches else range(40)):
            x, y = _batch(i)
            if i == 25 and not w.rollbacks:
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[w.step] = float(loss)
            w.log(loss=loss.detach())
            if w.step % every:
                continue
            with torch.no_grad():
                w.log(eval_loss=nn.functional.cross_entropy(model(_batch(99)[0]), _batch(99)[1]))
        w.close()
    return w, got, losses, [str(c.message) for c in caught if "lrwatch" in str(c.message)]


def test_a_value_too_late_for_a_judged_step_leaves_the_next_steps_as_they_are(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``flush_lag=0``, an evaluation logged after each step's loss: the flush step's
    evaluation comes after that step was judged and goes with the next step (one warning).
    It went there as a log before that step, which committed the row at the optimizer step,
    before the loop's loss: that loss then came late too, and from there every step's loss
    and evaluation went on the next step's line; a NaN batch's loss was on the line after
    its step, after the rollback too, and a second rollback followed (x0.25, to step 20;
    the sixteenth round's distributed audit saw it). Each step keeps its own loss now."""
    w, got, losses, said = _nan_run_with_evaluations(0, True, tmp_path)
    assert w.rollbacks == 1
    for s in got:
        if "loss" in s.values and math.isfinite(s.values["loss"]):
            assert s.values["loss"] == pytest.approx(losses[s.step], rel=1e-6), s.step
    assert sum("was judged" in m for m in said) == 1


def test_a_log_after_a_rollback_dropped_its_step_is_not_said_to_be_late(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``flush_lag=1``, no ``batches()``: the rollback is carried out at the loss's
    ``log()`` of the step whose flush lands, and drops that step (not judged); the
    evaluation logged next was said to come "after step N was judged"."""
    w, _, _, said = _nan_run_with_evaluations(1, False, tmp_path)
    assert w.rollbacks == 1
    assert not [m for m in said if "was judged" in m], said


def test_a_late_evaluation_of_a_rolled_back_step_does_not_go_onto_the_replay(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``flush_lag=0``, an evaluation logged on each flush step after its loss: the flush
    of step 28 judged the NaN steps and asked for a rollback, and that step's (NaN)
    evaluation, too late for it, waited for step 29; the rollback (at ``batches()``) kept
    it, and the replayed step 29 carried the abandoned weights' evaluation."""
    w, got, _, _ = _nan_run_with_evaluations(0, True, tmp_path, every=4)
    assert w.rollbacks == 1
    back = next(s.step for s in got if any(e.get("type") == "rollback" for e in s.events))
    after = [s.values["eval_loss"] for s in got if s.step > back and "eval_loss" in s.values]
    assert after and all(math.isfinite(v) for v in after), after
