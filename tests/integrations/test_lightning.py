"""LrwatchCallback in a real ``lightning.Trainer.fit`` on a tiny local model (CPU, no downloads)."""

from __future__ import annotations

import math
import statistics
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lrwatch.actions.policy import EXIT_BUDGET  # noqa: E402
from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.integrations.lightning import LrwatchCallback  # noqa: E402


class TinyMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05, sched: bool = True, nan_from: int | None = None,
                 fused: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
        self.lr, self.sched, self.nan_from, self.fused = lr, sched, nan_from, fused
        self.seen: list[int] = []  # first sample id of every batch trained on

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen.append(int(ids[0]))
        loss = nn.functional.cross_entropy(self.net(x), y)
        step = self.trainer.global_step
        if self.nan_from is not None and step >= self.nan_from and step % 12 == 0:
            loss = loss * float("nan")  # a bad batch every 12 steps, for ever
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9,
                              **({"fused": True} if self.fused else {}))
        if not self.sched:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(n: int = 640, batch: int = 16, seed: int = 0, shuffle: bool = False) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(n))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g)


class LrBomb(pl.Callback):
    """Sets a learning rate 10000x too high at global step ``at`` (persists: no schedule)."""

    def __init__(self, at: int) -> None:
        self.at, self.fired = at, 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
        if trainer.global_step >= self.at and not self.fired:
            self.fired += 1
            for g in trainer.optimizers[0].param_groups:
                g["lr"] = 500.0


class Scrape(pl.Callback):
    def __init__(self, cb: LrwatchCallback) -> None:
        self.cb, self.text = cb, ""

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        assert self.cb.metrics_url is not None
        with urllib.request.urlopen(self.cb.metrics_url, timeout=5) as r:
            self.text = r.read().decode()


def _trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> Any:
    kw.setdefault("max_steps", 60)
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=kw.pop("enable_checkpointing", False),
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks, **kw)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_metrics_on_http_and_trace(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(port=0, trace=str(trace), flush_every=5)
    scrape = Scrape(cb)
    model = TinyMLP()
    trainer = _trainer(tmp_path, [cb, scrape], max_steps=40, val_check_interval=20,
                       limit_val_batches=2)
    trainer.fit(model, _loader(), _loader(64, seed=1))
    text = scrape.text
    assert _metric(text, "lrwatch_step") == 40 == trainer.global_step
    assert _metric(text, "lrwatch_training_steps_total") == 40
    assert math.isfinite(_metric(text, "lrwatch_loss"))
    assert _metric(text, "lrwatch_grad_norm") > 0
    assert _metric(text, "lrwatch_learning_rate") == pytest.approx(0.05 / (1 + 0.01 * 39))
    assert 0 <= _metric(text, "lrwatch_eval_accuracy") <= 1
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, 41))
    # The learning rate of step k is the one the scheduler set for it (after k-1 scheduler steps).
    for s in samples:
        assert s.values["lr"] == pytest.approx(0.05 / (1 + 0.01 * (s.step - 1)), rel=1e-9)
        assert math.isfinite(s.values["loss"]) and s.values["grad_norm"] > 0
    evals = [s for s in samples if "eval_loss" in s.values]
    assert [s.step for s in evals] == [20, 40]  # validation results join their own step
    assert all("eval_accuracy" in s.values for s in evals)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 0


def test_grad_norm_is_measured_before_clipping(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=10, rules=None)
    _trainer(tmp_path, [cb], max_steps=20, gradient_clip_val=1e-3).fit(TinyMLP(), _loader())
    norms = [s.values["grad_norm"] for s in read_trace(trace)]
    assert min(norms) > 1e-2  # the clipped norm would be 1e-3


def test_injected_divergence_is_rolled_back_and_the_run_finishes_healthy(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"good_after": 4, "min_interval": 5, "cooldown": 0,
                                   "lr_factor": 0.5, "skip_batches": 3,
                                   "start_check": "off"})   # its shadow steps add to `seen`
    model = TinyMLP(sched=False)
    trainer = _trainer(tmp_path, [cb, LrBomb(at=25)], max_steps=70)
    trainer.fit(model, _loader())
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 1 and not w.should_stop
    assert cb.rollbacks == w.rollbacks == 1   # the public count for callback users
    assert trainer.global_step == 70 and w.step == 70  # one step count, the framework's
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    samples = read_trace(trace)
    # restored (0.05), x0.5, and once the probation passed (a one-off fault) the rate is back
    recovered = [e for s in samples for e in s.events if e.get("type") == "lr_recover"]
    assert len(recovered) == 1 and recovered[0]["factor"] == pytest.approx(2.0)
    assert lr == pytest.approx(0.05)
    rb = [e for s in samples for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and rb[0]["to_step"] < 25
    assert samples[-1].values["loss"] < 0.5 and math.isfinite(samples[-1].values["loss"])
    # Exactly three batches after the rollback were dropped before Lightning saw them.
    assert w.skipped_batches == 3
    seen = model.seen
    gaps = [(a, b) for a, b in zip(seen, seen[1:]) if b != a + 16 and b != 0]
    assert len(gaps) == 1 and gaps[0][1] - gaps[0][0] == 16 * 4


def test_budget_uses_lightning_stop(tmp_path: Path) -> None:
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off",
                                                  "good_after": 3, "min_interval": 3,
                                                  "cooldown": 0, "max_rollbacks": 2})
    trainer = _trainer(tmp_path, [cb], max_steps=200)
    trainer.fit(TinyMLP(sched=False, nan_from=20), _loader())
    assert trainer.should_stop and trainer.global_step < 200
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 2
    assert cb.exit_status == EXIT_BUDGET


@pytest.mark.parametrize("fused", [True, False])
def test_the_nan_steps_are_kept_off_the_parameters_by_default(tmp_path: Path,
                                                               fused: bool) -> None:
    # a bad batch every 12 steps from step 24: each one is skipped by the fused step (or,
    # not fused, on the CPU, its gradients are held back from the step), far enough apart
    # (good_after 10) that none needs a rollback, and the weights stay finite
    cb = LrwatchCallback(flush_every=5, recovery={"good_after": 10, "min_interval": 5})
    model = TinyMLP(sched=False, nan_from=20, fused=fused)
    _trainer(tmp_path, [cb], max_steps=80).fit(model, _loader())
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 0
    assert w.policy.state.drops_handled == 5            # steps 24, 36, 48, 60, 72
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_from_lightning_checkpoint_keeps_lrwatch_state(tmp_path: Path) -> None:
    ckdir = tmp_path / "ckpt"
    ck = pl.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=50, save_last=True)
    cb = LrwatchCallback(flush_every=2, recovery={"good_after": 4, "min_interval": 5,
                                                  "cooldown": 0})
    _trainer(tmp_path, [cb, ck, LrBomb(at=20)], max_steps=50,
             enable_checkpointing=True).fit(TinyMLP(sched=False), _loader())
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 1
    saved = torch.load(ckdir / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "LrwatchCallback" in k)
    assert state["policy"]["rollbacks"] == 1 and state["step"] == 50

    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            w = cb2.watcher
            assert w is not None and w.engine is not None
            seen.update(step=w.step, rollbacks=w.policy.rollbacks, engine=w.engine.state_dict())

    trace = tmp_path / "resumed.jsonl"
    cb2 = LrwatchCallback(flush_every=2, trace=str(trace))
    trainer = _trainer(tmp_path, [cb2, Probe()], max_steps=60)
    trainer.fit(TinyMLP(sched=False), _loader(), ckpt_path=str(ckdir / "last.ckpt"))
    assert seen["step"] == 50 and seen["rollbacks"] == 1
    # the detectors' state of the checkpoint, and the steps it had not judged judged on it
    # (the step Lightning saved at was not logged yet: its row carries its loss all the same)
    from lrwatch.rules import Engine, load_pack
    from lrwatch.trace import parse_record
    assert [r["step"] for r in state["unjudged"]] == [49, 50]
    engine = Engine(load_pack("training"))
    engine.load_state_dict(state["engine"])
    for record in state["unjudged"]:
        engine.update(parse_record(record))
    assert seen["engine"] == engine.state_dict()
    steps = [s.step for s in read_trace(trace)]
    assert steps == list(range(51, 61))


def test_a_run_too_hot_from_the_start_restarts_at_a_measured_rate(tmp_path: Path) -> None:
    """Lightning users get the probe with one setting (probe="auto"): the callback runs the
    module's own training_step on recent batches to measure the restart rate."""
    # the model's initial weights come from the global generator: fix them, so that the test
    # does not depend on what earlier tests drew (an unlucky draw restarts into repeated
    # loss_collapse rollbacks and spends the budget; the plumbing is what is tested here)
    torch.manual_seed(0)
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"good_after": 10, "min_interval": 5, "restart_warmup": 10,
                                   "probe": "auto"})
    model = TinyMLP(lr=200.0, sched=False)
    trainer = _trainer(tmp_path, [cb], max_steps=120)
    trainer.fit(model, _loader(shuffle=True))
    w = cb.watcher
    assert w is not None and not w.should_stop
    events = [e for s in read_trace(trace) for e in s.events]
    rb = [e for e in events if e.get("type") == "rollback"]
    probes = [e for e in events if e.get("type") == "probe"]
    assert rb and rb[0]["restart"] and rb[0]["probe"] and probes
    assert probes[0]["failed_lr"] == pytest.approx(200.0) and probes[0]["steps"] >= 3
    assert w.policy.state.probe_steps == sum(p["steps"] for p in probes)
    assert trainer.global_step == 120 and w.step == 120    # probe steps are not fit steps
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 200.0 * 0.2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the restart no longer diverges: the last 20 losses are finite and near the untrained
    # level, not blown up (how well a 120-step toy run then learns varies with the shuffled
    # batches; the quality of the measured rate is benchmarks/recovery.py's question)
    losses = [x.values["loss"] for x in read_trace(trace) if "loss" in x.values]
    tail = losses[-20:]
    assert all(math.isfinite(v) for v in tail)
    assert statistics.median(tail) < 2.0 * losses[0], (losses[0], tail)


def test_lr_find_before_training_starts_at_the_measured_rate(tmp_path: Path) -> None:
    """A rate 4000x too high: the range test runs before the first step (on the trainer's
    own data and training_step), the run starts at the suggestion and never rolls back."""
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=5, lr_find={"num_steps": 60})
    model = TinyMLP(lr=200.0, sched=True)
    trainer = _trainer(tmp_path, [cb], max_steps=80)
    trainer.fit(model, _loader(shuffle=True))
    curve = cb.lr_find_result
    assert curve is not None and curve.suggestion is not None and curve.suggestion < 20
    first = read_trace(trace)[0]
    # the first step ran at the suggestion, scaled through the scheduler (1 / (1 + 0.01 s))
    assert first.values["lr"] == pytest.approx(curve.suggestion, rel=1e-6)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 0
    assert read_trace(trace)[-1].values["loss"] < 0.5
    # without lr_find the same configuration blows up at once
    bare = tmp_path / "bare.jsonl"
    _trainer(tmp_path, [LrwatchCallback(trace=str(bare), flush_every=5, recovery=False)],
             max_steps=20).fit(TinyMLP(lr=200.0, sched=True), _loader(shuffle=True))
    losses = [s.values["loss"] for s in read_trace(bare)]
    assert (not all(math.isfinite(x) for x in losses)
            or max(losses) > 10 * first.values["loss"])


class LoggingMLP(TinyMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True)
        return loss


class KeepingMLP(TinyMLP):
    """Keeps every batch ``training_step`` sees (the measurement's included)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.__dict__.setdefault("batches", []).append((batch[0].clone(), batch[1].clone()))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("module", [KeepingMLP, LoggingMLP])
def test_the_untrained_loss_is_measured_before_the_first_step_and_changes_nothing(
        tmp_path: Path, module: Any) -> None:
    runs = {}
    for n in (0, 8):
        torch.manual_seed(0)
        model = module(sched=False)
        init = [p.detach().clone() for p in model.parameters()]
        # (the start check off: with the untrained batches it reads the first steps at no
        # shadow, without them it trains one; its own tests are below)
        cb = LrwatchCallback(trace=str(tmp_path / f"u{n}.jsonl"), flush_every=5,
                             untrained_batches=n, recovery={"start_check": "off"})
        _trainer(tmp_path, [cb], max_steps=20).fit(model, _loader(shuffle=True))
        runs[n] = (model, init, list(read_trace(tmp_path / f"u{n}.jsonl")))
    plain, measured = runs[0][0], runs[8][0]
    # the measurement ran training_step on 8 batches of a separate pass over the data
    # (Lightning made its own iterator before on_train_start, so that pass reads the next
    # shuffle); the fit then trained on exactly the order and to exactly the weights it does
    # without the measurement
    assert measured.seen[8:] == plain.seen and len(set(measured.seen[:8])) == 8
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))
    assert "untrained_loss" not in runs[0][2][0].values
    samples = runs[8][2]
    assert samples[0].step == 1 and "untrained_loss" in samples[0].values
    if module is KeepingMLP:     # the median loss of the initial weights on those 8 batches
        ref = TinyMLP(sched=False)
        with torch.no_grad():
            for p, q in zip(ref.parameters(), runs[8][1]):
                p.copy_(q)
            want = sorted(float(nn.functional.cross_entropy(ref.net(x), y))
                          for x, y in measured.batches[:8])
        assert samples[0].values["untrained_loss"] == pytest.approx((want[3] + want[4]) / 2,
                                                                    rel=1e-5)


def _noisy_loader(n: int = 6400, batch: int = 16) -> Any:
    """Labels flipped for 30% of the rows: the loss falls to its noise floor and stalls."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    flip = torch.rand(n, generator=g) < 0.3
    y = torch.where(flip, 1 - y, y)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(n))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g)


@pytest.mark.parametrize("sched", [False, True])
def test_a_stalled_loss_halves_the_rate_only_without_a_scheduler(tmp_path: Path,
                                                                 sched: bool) -> None:
    # the start check is off: it is not what this tests (here it adopts a tenth of the rate)
    cb = LrwatchCallback(flush_every=10, trace=str(tmp_path / "t.jsonl"),
                         recovery={"start_check": "off"})
    model = TinyMLP(lr=0.05, sched=sched)
    _trainer(tmp_path, [cb], max_steps=400).fit(model, _noisy_loader())
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 0
    lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    fired = [s.step for s in read_trace(tmp_path / "t.jsonl") for e in s.events
             if e.get("rule") == "loss_plateau" and e.get("type") == "firing"]
    assert fired                                  # the loss stalled in both runs
    if sched:       # left to its schedule: the configured rate on it, no cut
        assert w.policy.state.lr_reductions == 0
        assert lr == pytest.approx(0.05 / (1.0 + 0.01 * 400), rel=0.02)
    else:
        cuts = w.policy.state.lr_reductions
        assert cuts >= 1 and lr == pytest.approx(0.05 * 0.5 ** cuts)


def _check_run(tmp_path: Path, name: str, lr: float, check: str, **kw: Any) -> tuple:
    torch.manual_seed(0)
    model = TinyMLP(lr=lr, sched=True)
    cb = LrwatchCallback(trace=str(tmp_path / f"{name}.jsonl"), flush_every=5,
                         recovery={"start_check": check})
    trainer = _trainer(tmp_path, [cb], max_steps=40, **kw)
    trainer.fit(model, _loader())
    samples = list(read_trace(tmp_path / f"{name}.jsonl"))
    events = [e for s in samples for e in s.events if e.get("type") == "start_check"]
    return model, cb.watcher, trainer, samples, events


@pytest.mark.parametrize("clip,lr", [(None, 3.0), (0.5, 10.0)])   # clipped: hotter
def test_the_start_check_goes_on_at_a_tenth_of_a_rate_far_too_high(tmp_path: Path, clip: Any,
                                                                     lr: float) -> None:
    """Lightning draws the data, so the callback hands the check the batches it meets: the
    first 10 trained on, then 6 the run had not seen when its state after step 10 was kept.
    The shadow wins; having also trained on those 6 it takes over at step 16. The run is
    then, bit for bit, the run configured at a tenth of the rate from the start (with the
    trainer's gradient clipping, which the shadow applies too)."""
    model, w, trainer, _, events = _check_run(tmp_path, "hot", lr, "auto",
                                              gradient_clip_val=clip)
    ref, _, ref_trainer, _, none = _check_run(tmp_path, "tenth", lr / 10, "off",
                                              gradient_clip_val=clip)
    assert w.recovery.clip_grad_norm == clip
    assert none == [] and len(events) == 1
    e = events[0]
    assert e["step"] == 16 and e["lr_factor"] == pytest.approx(0.1)
    assert e["shadow_loss"] < e["held_out_loss"]
    # booked: 10 shadow steps, 6 more on the held-out batches, 12 forwards at a third
    assert e["steps"] == 16 and e["cost_steps"] == 20 and w.policy.state.probe_steps == 20
    assert w.policy.rollbacks == 0 and trainer.global_step == 40 and w.step == 40
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert (trainer.optimizers[0].param_groups[0]["lr"]
            == pytest.approx(ref_trainer.optimizers[0].param_groups[0]["lr"]))


def test_a_good_rate_stands_and_the_start_check_leaves_no_trace(tmp_path: Path) -> None:
    # the untrained loss was measured on a second pass over the loader that drew the run's
    # own first batches (checked at the gate): the first steps left no batch worse than the
    # untouched module, so no shadow is trained and nothing is booked
    model, w, _, samples, events = _check_run(tmp_path, "on", 0.05, "auto")
    ref, _, _, ref_samples, _ = _check_run(tmp_path, "off", 0.05, "off")
    assert len(events) == 1 and events[0]["lr_factor"] == 1.0
    assert events[0]["steps"] == 0 and events[0]["worst_ratio"] <= 1.05
    assert w.policy.state.probe_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert ([s.values["loss"] for s in samples] == [s.values["loss"] for s in ref_samples])


def test_the_start_check_is_skipped_under_gradient_accumulation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two batches per optimizer step: the shadow could not repeat the run's steps, so the
    check says why it is skipped, books nothing and changes nothing."""
    import logging
    with caplog.at_level(logging.INFO, logger="lrwatch"):
        model, w, _, _, events = _check_run(tmp_path, "acc", 3.0, "auto",
                                            accumulate_grad_batches=2)
    ref, _, _, _, _ = _check_run(tmp_path, "acc_off", 3.0, "off", accumulate_grad_batches=2)
    assert events == [] and w.policy.state.probe_steps == 0
    # skipped at the second batch of the first step: no more batches are held
    assert "start check skipped (2 batches over the first 1 steps" in caplog.text
    assert w._observed is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


class ManualMLP(TinyMLP):
    """Manual optimization: training_step steps the optimizer itself."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_runs_no_shadow_of_training_step_unless_given_a_probe_loss(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """training_step steps the optimizer itself under manual optimization, so the callback
    does not run it on a copy of the run (it said so with an internal error before): without
    probe_loss nothing that needs one runs, and the run is the run without lrwatch's checks;
    with one, the start check runs on it."""
    import logging
    runs = {}
    for name, kw in (("plain", {}), ("probe", {"probe_loss": lambda m, b: nn.functional
                                              .cross_entropy(m.net(b[0]), b[1])})):
        torch.manual_seed(0)
        model = ManualMLP(lr=3.0, sched=False)
        cb = LrwatchCallback(trace=str(tmp_path / f"{name}.jsonl"), flush_every=5, **kw)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lrwatch"):
            _trainer(tmp_path, [cb], max_steps=30).fit(model, _loader())
        runs[name] = (cb.watcher, caplog.text,
                      [e for s in read_trace(tmp_path / f"{name}.jsonl") for e in s.events
                       if e.get("type") == "start_check"])
    w, text, checks = runs["plain"]
    assert "manual optimization" in text and "internal error" not in text
    assert checks == [] and w.policy.state.probe_steps == 0
    w, text, checks = runs["probe"]
    assert "internal error" not in text and "manual optimization" not in text
    assert len(checks) == 1 and checks[0]["lr_factor"] == pytest.approx(0.1)


class EpochLoggingMLP(TinyMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss_mean", loss, on_step=False, on_epoch=True)
        self.log("train_loss_now", loss, on_step=True, on_epoch=False)
        return loss


def test_lrwatchs_own_training_step_calls_do_not_reach_the_logged_metrics(
        tmp_path: Path) -> None:
    """The untrained-loss measurement and the start check's shadow call training_step 8 and
    22 times; their self.log calls are dropped, so the epoch mean and the last step's value
    the module logs are those of the run without either (the run being the same)."""
    metrics = []
    for check, untrained in (("auto", 0), ("off", 8), ("off", 0)):
        torch.manual_seed(0)
        model = EpochLoggingMLP(lr=0.05, sched=True)
        cb = LrwatchCallback(flush_every=5, recovery={"start_check": check},
                             untrained_batches=untrained)
        trainer = _trainer(tmp_path, [cb], max_steps=40)
        trainer.fit(model, _loader())
        metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        if check == "auto":
            assert cb.watcher is not None and cb.watcher.policy.state.probe_steps == 14
    assert set(metrics[0]) == {"train_loss_mean", "train_loss_now"}
    assert metrics[0] == metrics[2] and metrics[1] == metrics[2]


def test_the_start_check_is_skipped_when_its_copies_would_not_fit_in_host_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from lrwatch.actions import host_memory
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1024)
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        _, w, _, _, events = _check_run(tmp_path, "mem", 3.0, "auto")
    assert events == [] and w.policy.state.probe_steps == 0 and w._observed is None
    assert "start check skipped (3 copies of the run's weights" in caplog.text


class SkippingMLP(TinyMLP):
    """Skips every 10th..12th batch the Lightning way: training_step returns None."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 10 in (3, 4, 5):
            return None
        return super().training_step(batch, batch_idx)


def test_a_skipped_training_step_is_not_a_vanished_gradient(tmp_path: Path) -> None:
    """A step whose training_step returned None has no gradient. It was recorded with a
    gradient norm of 0, and three in a row fired vanishing_gradient: a healthy run
    restarted at a tenth of its rate, twice."""
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=5)
    _trainer(tmp_path, [cb], max_steps=70).fit(SkippingMLP(lr=0.05, sched=False), _loader())
    samples = read_trace(trace)
    skipped = [s for s in samples if "loss" not in s.values]
    assert len(skipped) >= 15 and not any("grad_norm" in s.values for s in skipped)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 0


def test_under_gradient_accumulation_the_loss_is_the_micro_batches_mean(tmp_path: Path
                                                                        ) -> None:
    """Lightning hands over each micro-batch's loss divided by accumulate_grad_batches; the
    step's loss is their mean, on the scale of the untrained loss (it was a quarter of it)."""
    trace = tmp_path / "run.jsonl"
    model = TinyMLP(lr=0.05, sched=False)
    losses: list[float] = []
    orig = model.training_step

    def step(batch: Any, batch_idx: int) -> torch.Tensor:
        loss = orig(batch, batch_idx)
        losses.append(float(loss))
        return loss

    model.training_step = step   # type: ignore[method-assign]
    cb = LrwatchCallback(trace=str(trace), flush_every=5, recovery=False)
    _trainer(tmp_path, [cb], max_steps=6, accumulate_grad_batches=4).fit(model, _loader())
    recorded = [s.values["loss"] for s in read_trace(trace) if "loss" in s.values]
    assert len(recorded) == 6
    for i, got in enumerate(recorded):   # (the first losses are the untrained measurement's)
        mine = losses[-24:][4 * i:4 * i + 4]
        assert got == pytest.approx(sum(mine) / 4, rel=1e-5)


def test_no_start_check_once_the_fit_is_over(tmp_path: Path) -> None:
    """max_steps=16: the check's boundary falls at on_train_end, after Lightning wrote its
    last checkpoint; the in-memory model was then swapped for the shadow, unsaid."""
    torch.manual_seed(0)
    model = TinyMLP(lr=3.0, sched=True)
    cb = LrwatchCallback(trace=str(tmp_path / "run.jsonl"), flush_every=5)
    _trainer(tmp_path, [cb], max_steps=16).fit(model, _loader())
    assert cb.watcher is not None and not cb.watcher.rollbacks
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3.0 / 1.16)


def test_lr_find_under_a_warm_up_puts_the_peak_at_the_suggestion(tmp_path: Path) -> None:
    class WarmMLP(TinyMLP):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=5, lr_find={"num_steps": 60},
                         recovery={"start_check": "off"})
    _trainer(tmp_path, [cb], max_steps=10).fit(WarmMLP(lr=3.0), _loader(shuffle=True))
    s = cb.lr_find_result.suggestion
    assert s is not None
    rates = [x.values["lr"] for x in read_trace(trace)]
    assert rates[0] == pytest.approx(s / 5, rel=1e-6) and max(rates) == pytest.approx(s, rel=1e-6)


def test_several_optimizers_get_no_recovery_and_are_told_why(tmp_path: Path) -> None:
    """A rollback restores every weight but could restore only the first optimizer's state
    (the others kept their rate and momentum): with several, recovery is off, said once."""
    class TwoOpt(ManualMLP):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.05),
                    torch.optim.SGD(self.net[2].parameters(), lr=0.05)]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, _ = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
            return loss

    cb = LrwatchCallback(trace=str(tmp_path / "run.jsonl"), flush_every=5)
    with pytest.warns(UserWarning, match="recovery .* is off"):
        _trainer(tmp_path, [cb], max_steps=20).fit(TwoOpt(), _loader())
    assert cb.watcher is not None and cb.watcher.recovery is None


def test_a_stream_is_read_once_and_its_first_batch_gives_the_untrained_loss(
        tmp_path: Path) -> None:
    """A one-pass IterableDataset: a second pass for the untrained loss drew from the run's
    own stream (it lost batches 3-10); now the batch the run is about to train on is measured,
    before it trains on it, and the run sees every batch in order."""
    class Stream(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(320, 8, generator=g)
            self.it: Any = None

        def __iter__(self) -> Any:
            if self.it is None:   # one pass, shared: a second iterator continues it
                self.it = iter(range(len(self.x)))
            for i in self.it:
                yield self.x[i], (self.x[i, 0] > 0).long(), torch.tensor(i)

    trace = tmp_path / "run.jsonl"
    model = TinyMLP(lr=0.05, sched=False)
    loader = torch.utils.data.DataLoader(Stream(), batch_size=16)
    _trainer(tmp_path, [LrwatchCallback(trace=str(trace), flush_every=5)],
             max_steps=12).fit(model, loader)
    # the measurement's own training_step call on batch 0 first, then the run's, in order
    assert model.seen[:13] == [0] + [16 * i for i in range(12)]
    assert "untrained_loss" in read_trace(trace)[0].values


def test_a_cut_during_stochastic_weight_averaging_reaches_swalr(tmp_path: Path) -> None:
    """Lightning's SWA swaps LambdaLR for SWALR at its start epoch (step 80 here); a failure
    after that is rolled back to a snapshot from before the swap with the rate halved. The
    cut must reach SWALR's target rate (else SWALR anneals the run straight back to it), and
    the old scheduler's state is not loaded into SWALR."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    trace = tmp_path / "swa.jsonl"
    # snapshots every 60 steps exactly (the interval otherwise adapts to measured times, and
    # with it which snapshot the rollback finds): the newest before the failure is step 60
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"good_after": 4, "min_interval": 60, "max_interval": 60,
                                   "cooldown": 0, "lr_factor": 0.5, "sudden_lr_factor": 0.5,
                                   "lr_recover": False, "start_check": "off"})
    model = TinyMLP(sched=True)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2)
    trainer = _trainer(tmp_path, [cb, swa, LrBomb(at=100)], max_steps=-1, max_epochs=4)
    trainer.fit(model, _loader())
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 1 and w.policy.lr_scale == 0.5
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert type(sched).__name__ == "SWALR" and w.scheduler is sched
    group = trainer.optimizers[0].param_groups[0]
    assert group["swa_lr"] == pytest.approx(0.01)
    rb = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and rb[0]["to_step"] < 80 < rb[0]["step"]
    assert group["lr"] < 0.02 and all(torch.isfinite(p).all() for p in model.parameters())
