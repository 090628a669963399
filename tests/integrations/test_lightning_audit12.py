"""Twelfth audit round (6 December): the Lightning callback under unusual but legitimate use,
with a real ``lightning.Trainer`` on the tiny MLP of ``test_lightning`` (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.integrations.lightning import LrwatchCallback  # noqa: E402

from .test_lightning import LrBomb, TinyMLP, _loader, _trainer  # noqa: E402


def test_one_callback_fits_then_resumes_from_an_earlier_checkpoint(tmp_path: Path) -> None:
    """The same callback object in a second ``fit(ckpt_path=...)`` (a notebook, a script that
    builds its callbacks once): Lightning hands it the checkpoint's state before the fit
    starts, while the first fit's Watcher is closed. That state went into the closed Watcher,
    whose trace it opened again and kept open: the resumed run could not write its trace
    (another writer) and its steps after the checkpoint were lost."""
    ckdir = tmp_path / "ck"
    ck = pl.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=10, save_top_k=-1)
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(flush_every=2, trace=str(trace),
                         recovery={"good_after": 4, "min_interval": 5, "cooldown": 0})
    _trainer(tmp_path, [cb, ck, LrBomb(at=18), LrBomb(at=35)], max_steps=50,
             enable_checkpointing=True).fit(TinyMLP(sched=False), _loader())
    ckpt = next(ckdir.glob("*step=30.ckpt"))
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                 if "LrwatchCallback" in k)
    at_30 = saved["policy"]["rollbacks"]
    assert saved["step"] == 30 and 0 < at_30 < cb.rollbacks   # a rollback after it, too

    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            assert cb.watcher is not None
            seen.update(step=cb.watcher.step, rollbacks=cb.rollbacks)

    trainer = _trainer(tmp_path, [cb, Probe()], max_steps=40)
    trainer.fit(TinyMLP(sched=False), _loader(), ckpt_path=str(ckpt))
    assert seen == {"step": 30, "rollbacks": at_30}   # the checkpoint's state, not the fit's end
    w = cb.watcher
    assert w is not None and w.step == 40 == trainer.global_step
    assert w.exporter.internal_errors._value.get() == 0
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, 41))   # 1-30 kept, 31-40 resumed
    assert any(e.get("type") == "resume" for s in samples for e in s.events)


def test_one_callback_in_a_second_fresh_fit_starts_at_the_trainers_step(tmp_path: Path
                                                                         ) -> None:
    """A second ``fit`` from scratch (a new Trainer, no checkpoint) with the same callback:
    lrwatch's step must be the framework's global step again, not the first fit's end."""
    cb = LrwatchCallback(flush_every=5, recovery=False)
    _trainer(tmp_path, [cb], max_steps=20).fit(TinyMLP(sched=False), _loader())
    assert cb.watcher is not None and cb.watcher.step == 20
    trace = tmp_path / "second.jsonl"
    cb.watcher_kwargs["trace"] = str(trace)
    trainer = _trainer(tmp_path, [cb], max_steps=10)
    trainer.fit(TinyMLP(sched=False), _loader())
    assert cb.watcher.step == 10 == trainer.global_step
    assert [s.step for s in read_trace(trace)] == list(range(1, 11))


class ManualClipped(TinyMLP):
    """Manual optimization as Lightning documents it: backward, clip, step, schedule."""

    def __init__(self, clip: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y, _ = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        return loss


def test_manual_optimization_measures_the_gradient_before_its_clipping(tmp_path: Path
                                                                       ) -> None:
    """Under manual optimization training_step clips (``self.clip_gradients``) before it
    steps, and Lightning calls on_before_optimizer_step inside ``opt.step()``: the recorded
    norm was the clipped one (1e-3 at every step, an explosion clipped away from the rules)."""
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=10, rules=None,
                         probe_loss=lambda m, b: torch.nn.functional.cross_entropy(
                             m.net(b[0]), b[1]))
    _trainer(tmp_path, [cb], max_steps=20).fit(ManualClipped(1e-3, sched=False), _loader())
    norms = [s.values["grad_norm"] for s in read_trace(trace)]
    assert len(norms) == 20 and min(norms) > 1e-2   # the clipped norm would be 1e-3


def test_a_stop_trains_no_further_batch(tmp_path: Path) -> None:
    """The rollback budget spent: the stop puts the last known-good state back and takes a
    final snapshot of it. Lightning reads a -1 from the module's on_train_batch_start only, not
    from a callback's, so it trained the batch at hand on top: the weights it ended with (and
    wrote to its last checkpoint) were neither the known-good state nor the final snapshot."""
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off", "good_after": 3,
                                                  "min_interval": 3, "cooldown": 0,
                                                  "max_rollbacks": 2})
    model = TinyMLP(sched=False, nan_from=20)
    trainer = _trainer(tmp_path, [cb], max_steps=200)
    trainer.fit(model, _loader())
    w = cb.watcher
    assert w is not None and w.should_stop and cb.exit_status == 4
    assert w.store is not None
    final = w.store.latest()
    assert final is not None and final.step == w.step == trainer.global_step
    kept = final.load()["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept[name]), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_validation_between_micro_batches_joins_the_step_it_evaluated(tmp_path: Path
                                                                         ) -> None:
    """accumulate_grad_batches=2, val_check_interval=3 batches: Lightning validates after
    batch 3, the first micro-batch of step 2, so the weights it evaluates are step 1's. The
    boundary of step 1 has passed by then (the first micro-batch's on_train_batch_start), so
    the result joined step 2 -- and keep_best kept step 2's weights for step 1's score. Now
    it joins the step it evaluated, and the best kept is the state that was evaluated."""
    evaluated: list[int] = []
    weights: dict[int, list[torch.Tensor]] = {}

    class Spy(pl.Callback):
        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            evaluated.append(int(trainer.global_step))
            weights[int(trainer.global_step)] = [p.detach().clone()
                                                 for p in pl_module.parameters()]

    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(flush_every=2, trace=str(trace), recovery=False)
    model = TinyMLP()
    _trainer(tmp_path, [cb, Spy()], max_steps=8, accumulate_grad_batches=2,
             val_check_interval=3, limit_val_batches=1).fit(
        model, _loader(), _loader(64, seed=1))
    joined = [s.step for s in read_trace(trace) if "eval_loss" in s.values]
    assert evaluated == [1, 3, 4, 6, 7]
    assert joined == evaluated
    w = cb.watcher
    assert w is not None and w.best_eval is not None
    best = w.best_eval.step
    assert best in evaluated
    w.restore_best()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights[best])), best


def test_under_bf16_mixed_the_adopted_shadow_is_the_run_at_a_tenth(tmp_path: Path) -> None:
    """precision="bf16-mixed": Lightning runs training_step under its precision plugin's
    autocast; lrwatch's own calls of it (the untrained loss, the start check's shadow, the
    range tests) ran outside it, in float32, so an adopted shadow was not the run configured
    at a tenth of the rate (the docs say bit for bit), and the untrained loss and the gate
    scored another network than the run trains."""
    from .test_lightning import _check_run

    model, w, trainer, _, events = _check_run(tmp_path, "hot", 3.0, "auto",
                                              precision="bf16-mixed")
    ref, _, _, _, none = _check_run(tmp_path, "tenth", 0.3, "off", precision="bf16-mixed")
    assert none == [] and len(events) == 1 and events[0]["step"] == 16
    assert trainer.global_step == 40 and w.policy.rollbacks == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
