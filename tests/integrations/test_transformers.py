"""LrwatchCallback in a real ``transformers.Trainer.train`` on a tiny GPT-2 made in code (CPU)."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lrwatch.actions.policy import EXIT_BUDGET  # noqa: E402
from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.integrations.transformers import STATE_FILE, LrwatchCallback  # noqa: E402


class Seqs(torch.utils.data.Dataset):
    """Counting sequences mod 32 with a random start: easy to learn, no download."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, 32, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] + torch.arange(16)) % 32
        return {"input_ids": ids, "labels": ids.clone(), "idx": torch.tensor(i)}


def _model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    return GPT2LMHeadModel(cfg)


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels")}


def _args(tmp_path: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                learning_rate=3e-3, max_steps=40, logging_steps=10, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                lr_scheduler_type="constant", remove_unused_columns=False, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _train(tmp_path: Path, cb: LrwatchCallback, extra: list[Any] = (), model: Any = None,
           resume: str | None = None, **kw: Any) -> Any:
    trainer = Trainer(model=model if model is not None else _model(), args=_args(tmp_path, **kw),
                      train_dataset=Seqs(2000), eval_dataset=Seqs(32, seed=1),
                      data_collator=_collate, callbacks=[cb, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class Scrape(TrainerCallback):
    def __init__(self, cb: LrwatchCallback) -> None:
        self.cb, self.text = cb, ""

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        pass

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == state.max_steps:  # before the callback closes its server
            with urllib.request.urlopen(self.cb.metrics_url, timeout=5) as r:
                self.text = r.read().decode()


class Poison(TrainerCallback):
    """Makes the model's loss NaN at the given global steps (a poisoned batch)."""

    def __init__(self, model: Any, steps: Any) -> None:
        self.steps, self.on = steps, False
        model.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        if self.on and module.training:
            output.loss = output.loss * float("nan")
        return output

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.on = (state.global_step + 1) in self.steps


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_metrics_on_http_and_trace(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(port=0, trace=str(trace), flush_every=5)
    scrape = Scrape(cb)
    trainer = _train(tmp_path, cb, [scrape], eval_strategy="steps", eval_steps=20,
                     max_grad_norm=1e-3, lr_scheduler_type="linear", warmup_steps=5)
    text = scrape.text
    assert _metric(text, "lrwatch_training_steps_total") >= 35
    assert math.isfinite(_metric(text, "lrwatch_loss"))
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, 41)) and trainer.state.global_step == 40
    # Gradient norms before the Trainer's clipping (it clips to 1e-3 here).
    assert min(s.values["grad_norm"] for s in samples) > 1e-2
    # Learning rate of step k: the linear schedule after k-1 scheduler steps (warm-up 5).
    def sched(k: int) -> float:
        s = k - 1
        return 3e-3 * (s / 5 if s < 5 else max(0.0, (40 - s) / 35))
    for s in samples:
        assert s.values["lr"] == pytest.approx(sched(s.step), rel=1e-6, abs=1e-12)
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert set(logged) == {10, 20, 30, 40}
    # The Trainer's logged loss averages logging_steps steps; ours is per step.
    by_step = {s.step: s.values["loss"] for s in samples}
    for step, loss in logged.items():
        assert loss == pytest.approx(sum(by_step[k] for k in range(step - 9, step + 1)) / 10,
                                     rel=1e-4)
    evals = [s for s in samples if "eval_loss" in s.values]
    assert [s.step for s in evals] == [20, 40]


@pytest.mark.slow
def test_poisoned_batch_is_rolled_back_and_the_run_finishes_healthy(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    model = _model()
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"guard": "off",
                                   "good_after": 4, "min_interval": 5, "cooldown": 0,
                                   "skip_batches": 2})
    trainer = _train(tmp_path, cb, [Poison(model, {25})], model=model, max_steps=60)
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 1 and not w.should_stop
    assert trainer.state.global_step == 60 == w.step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    samples = read_trace(trace)
    rb = [e for s in samples for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and rb[0]["to_step"] < 25
    assert math.isnan(next(s for s in samples if s.step == 25).values["loss"])
    at = next(s.step for s in samples if any(e.get("type") == "rollback" for e in s.events))
    assert at <= 26  # detected at the first flush after the bad step
    assert all(math.isfinite(s.values["loss"]) for s in samples if s.step > at)
    assert samples[-1].values["loss"] < samples[0].values["loss"]
    assert w.skipped_batches == 2


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_nan_step_is_kept_off_the_parameters_by_default(tmp_path: Path, optim: str) -> None:
    # fused: skipped on the device; not fused, on the CPU: its gradients held back
    trace = tmp_path / "run.jsonl"
    model = _model()
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"good_after": 4, "min_interval": 5, "cooldown": 0})
    _train(tmp_path, cb, [Poison(model, {25})], model=model, max_steps=40, optim=optim)
    w = cb.watcher
    assert w is not None and w.policy.rollbacks == 0 and w.policy.state.drops_handled == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    samples = read_trace(trace)
    assert [(e["type"], e["step"]) for s in samples for e in s.events
            if e.get("type") == "dropped"] == [("dropped", 25)]
    assert all(math.isfinite(s.values["loss"]) for s in samples if s.step > 25)


@pytest.mark.slow
def test_budget_uses_the_trainer_stop(tmp_path: Path) -> None:
    model = _model()
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off",
                                                  "good_after": 3, "min_interval": 3,
                                                  "cooldown": 0, "max_rollbacks": 2})
    trainer = _train(tmp_path, cb, [Poison(model, set(range(20, 400, 12)))], model=model,
                     max_steps=300)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 2
    assert cb.rollbacks == 2   # the public count for callback users
    assert cb.exit_status == EXIT_BUDGET
    assert trainer.state.global_step < 300  # control.should_training_stop ended the run


class CountDown(Seqs):
    """Counting *down* mod 32: what it teaches makes the counting-up evaluation worse."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] - torch.arange(16)) % 32
        return {"input_ids": ids, "labels": ids.clone(), "idx": torch.tensor(i)}


def test_eval_on_start_is_the_start_state_and_not_step_one(tmp_path: Path) -> None:
    """``eval_on_start`` evaluates the start state before step 1: its values join no step
    (they used to join step 1's sample), and when training only makes the evaluation worse the
    best evaluated state is the start's, and restoring it puts the start weights back."""
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=5, keep_best="eval_loss")
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=_args(tmp_path, eval_on_start=True,
                                              eval_strategy="steps", eval_steps=40),
                      train_dataset=CountDown(2000), eval_dataset=Seqs(32, seed=1),
                      data_collator=_collate, callbacks=[cb])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 40]
    assert evals[0]["eval_loss"] < evals[1]["eval_loss"]
    samples = read_trace(trace)
    assert [s.step for s in samples if "eval_loss" in s.values] == [40]
    best = cb.watcher.best_eval
    assert best is not None and best.step == 0
    assert best.value == pytest.approx(evals[0]["eval_loss"], rel=1e-5)
    cb.watcher.restore_best()
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


@pytest.mark.slow
def test_resume_from_trainer_checkpoint_keeps_lrwatch_state(tmp_path: Path) -> None:
    model = _model()
    cb = LrwatchCallback(flush_every=2, recovery={"guard": "off",
                                                  "good_after": 4, "min_interval": 5,
                                                  "cooldown": 0})
    _train(tmp_path, cb, [Poison(model, {18})], model=model, max_steps=30,
           save_strategy="steps", save_steps=30)
    ck = tmp_path / "out" / "checkpoint-30"
    saved = json.loads((ck / STATE_FILE).read_text())
    assert saved["policy"]["rollbacks"] == 1 and saved["step"] == 30

    seen: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            w = cb2.watcher
            assert w is not None and w.engine is not None
            seen.update(step=w.step, rollbacks=w.policy.rollbacks,
                        engine=json.loads(json.dumps(w.engine.state_dict())))

    trace = tmp_path / "resumed.jsonl"
    cb2 = LrwatchCallback(flush_every=2, trace=str(trace))
    _train(tmp_path, cb2, [Probe()], max_steps=40, resume=str(ck))
    assert seen["step"] == 30 and seen["rollbacks"] == 1
    # the detectors' state of the checkpoint, and the steps it had not judged judged on it
    from lrwatch.rules import Engine, load_pack
    from lrwatch.trace import parse_record
    assert saved["unjudged"] and saved["unjudged"][-1]["step"] == 30
    engine = Engine(load_pack("training"))
    engine.load_state_dict(saved["engine"])
    for record in saved["unjudged"]:
        engine.update(parse_record(record))
    assert seen["engine"] == json.loads(json.dumps(engine.state_dict()))
    assert [s.step for s in read_trace(trace)] == list(range(31, 41))


def test_a_run_too_hot_from_the_start_restarts_at_a_measured_rate(tmp_path: Path) -> None:
    """probe="auto": the callback remembers the model inputs its forward hook sees and a
    restart measures its rate on them (the probe's forwards are not counted as the run's)."""
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=2,
                         recovery={"good_after": 10, "min_interval": 5, "restart_warmup": 10,
                                   "probe": "auto"})
    trainer = _train(tmp_path, cb, max_steps=120, learning_rate=3.0)
    w = cb.watcher
    assert w is not None
    events = [e for s in read_trace(trace) for e in s.events]
    rb = [e for e in events if e.get("type") == "rollback"]
    probes = [e for e in events if e.get("type") == "probe"]
    assert rb and rb[0]["restart"] and rb[0]["probe"] and probes, events
    assert probes[0]["failed_lr"] == pytest.approx(3.0) and probes[0]["steps"] >= 3
    assert trainer.state.global_step == 120 and w.step == 120
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _model_no_dropout() -> Any:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def test_the_untrained_loss_is_measured_on_sampled_batches_and_changes_nothing(
        tmp_path: Path) -> None:
    finals, traces = [], []
    for n in (0, 8):
        model = _model_no_dropout()
        init = {k: v.clone() for k, v in model.state_dict().items()}
        cb = LrwatchCallback(trace=str(tmp_path / f"u{n}.jsonl"), flush_every=5,
                             untrained_batches=n)
        _train(tmp_path, cb, model=model, max_steps=12)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        traces.append(list(read_trace(tmp_path / f"u{n}.jsonl")))
    # the Trainer's run is the same with and without the measurement (its dataloader and RNG
    # untouched), and only the measured run carries untrained_loss, in step 1
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert [s.values["loss"] for s in traces[0]] == [s.values["loss"] for s in traces[1]]
    assert "untrained_loss" not in traces[0][0].values
    got = traces[1][0].values["untrained_loss"]
    # what it should be: the initial model's median loss on 8 batches of 8 sampled by the
    # private generator (seed 0) from the training set
    ds = Seqs(2000)
    ref = _model_no_dropout()
    ref.load_state_dict(init)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        losses = sorted(float(ref(**_collate([ds[i] for i in order[k * 8:(k + 1) * 8]])).loss)
                        for k in range(8))
    assert got == pytest.approx((losses[3] + losses[4]) / 2, rel=1e-4)


def _check_run(tmp_path: Path, name: str, lr: float, check: str, **kw: Any) -> tuple:
    model = _model_no_dropout()
    cb = LrwatchCallback(trace=str(tmp_path / f"{name}.jsonl"), flush_every=5,
                         recovery={"start_check": check})
    trainer = _train(tmp_path, cb, model=model, max_steps=30, learning_rate=lr, **kw)
    samples = list(read_trace(tmp_path / f"{name}.jsonl"))
    events = [e for s in samples for e in s.events if e.get("type") == "start_check"]
    return model, cb.watcher, trainer, samples, events


def test_the_start_check_goes_on_at_a_tenth_of_a_rate_far_too_high(tmp_path: Path) -> None:
    """The Trainer draws the data: the forward hook hands the check the batches (the first
    10, then the 6 held out), and the check runs at a step boundary (on_step_begin), never
    inside a forward. An adopted shadow makes the run, bit for bit, the one configured at a
    tenth of the rate from the start (AdamW, constant schedule; the shadow clips its
    gradients to the Trainer's max_grad_norm, 1.0 by default, as the run does)."""
    model, w, trainer, _, events = _check_run(tmp_path, "hot", 0.3, "auto")
    ref, _, ref_trainer, _, none = _check_run(tmp_path, "tenth", 0.03, "off")
    assert none == [] and len(events) == 1
    e = events[0]
    assert e["step"] == 16 and e["lr_factor"] == pytest.approx(0.1)
    # 16 shadow steps, 12 held-out forwards and the gate's 8 (it measured the untouched
    # network on the run's first batches at the check: the Trainer's sampler drew them)
    assert e["steps"] == 16 and e["cost_steps"] == 23 and w.policy.state.probe_steps == 23
    assert w.policy.rollbacks == 0 and trainer.state.global_step == 30 and w.step == 30
    assert w.recovery.clip_grad_norm == 1.0      # read off the Trainer's arguments
    state, want = model.state_dict(), ref.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert (trainer.optimizer.param_groups[0]["lr"]
            == pytest.approx(ref_trainer.optimizer.param_groups[0]["lr"]))


def test_a_good_rate_stands_and_the_start_check_leaves_no_trace(tmp_path: Path) -> None:
    """The gate measures the untouched network on the run's own first batches at the check
    (the callback's untrained-loss batches are a sample of its own, not the Trainer's first):
    no step made a batch worse, so no shadow; 8 forwards booked, the run untouched."""
    model, w, _, samples, events = _check_run(tmp_path, "on", 3e-3, "auto")
    ref, _, _, ref_samples, _ = _check_run(tmp_path, "off", 3e-3, "off")
    assert len(events) == 1 and events[0]["lr_factor"] == 1.0, events
    assert events[0]["steps"] == 0 and events[0]["worst_ratio"] <= 1.05
    assert "no shadow" in events[0]["reason"]
    assert w.policy.state.probe_steps == events[0]["cost_steps"] == 3
    state, want = model.state_dict(), ref.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert [s.values["loss"] for s in samples] == [s.values["loss"] for s in ref_samples]


def test_the_start_check_is_skipped_under_gradient_accumulation(tmp_path: Path) -> None:
    _, w, _, _, events = _check_run(tmp_path, "acc", 0.3, "auto",
                                    gradient_accumulation_steps=2)
    assert events == [] and w.policy.state.probe_steps == 0


def test_lr_find_before_training_starts_at_the_measured_rate(tmp_path: Path) -> None:
    """AdamW at 3.0 (a thousand times too high): with lr_find=True the range test runs before
    the first step on batches sampled from the training dataset with the model's own loss,
    and the run starts at its suggestion -- exactly the run configured at that rate (the
    model, optimizer, RNG and the Trainer's dataloader untouched by the test)."""
    trace = tmp_path / "run.jsonl"
    off = {"start_check": "off"}
    cb = LrwatchCallback(trace=str(trace), flush_every=5, lr_find={"num_steps": 60},
                         recovery=off)
    model = _model_no_dropout()
    trainer = _train(tmp_path, cb, model=model, max_steps=40, learning_rate=3.0)
    curve = cb.lr_find_result
    assert curve is not None and curve.suggestion is not None and curve.suggestion < 0.3
    samples = list(read_trace(trace))
    assert samples[0].values["lr"] == pytest.approx(curve.suggestion, rel=1e-6)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(curve.suggestion, rel=1e-6)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 0
    assert samples[-1].values["loss"] < samples[0].values["loss"] / 2
    # the same run configured at the suggestion, without the test
    ref = _model_no_dropout()
    ref_cb = LrwatchCallback(trace=str(tmp_path / "ref.jsonl"), flush_every=5, recovery=off)
    _train(tmp_path, ref_cb, model=ref, max_steps=40, learning_rate=curve.suggestion)
    got, want = model.state_dict(), ref.state_dict()
    assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want)
    ref_losses = [s.values["loss"] for s in read_trace(tmp_path / "ref.jsonl")]
    assert [s.values["loss"] for s in samples] == pytest.approx(ref_losses, rel=1e-4)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        data = Seqs(64)
        return (data[i] for i in range(len(data)))


def test_lr_find_needs_a_map_style_dataset(tmp_path: Path) -> None:
    from lrwatch.errors import ConfigError
    with pytest.raises(ConfigError, match="lr_find must be True/False or a dict"):
        LrwatchCallback(lr_find="yes")
    cb = LrwatchCallback(lr_find=True)
    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=2),
                      train_dataset=_Stream(), data_collator=_collate, callbacks=[cb])
    with pytest.raises(ConfigError, match="map-style dataset"):
        trainer.train()


class _OwnLoss(Trainer):
    """A Trainer that computes the loss itself: the model's output carries none."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     **kw: Any) -> Any:
        labels = inputs.pop("labels")
        out = model(**inputs)
        logits = out.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1))
        return (loss, out) if return_outputs else loss


def test_a_trainer_that_computes_its_own_loss_gets_no_start_check_and_no_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The shadow would call the model for its loss; a model that returns none is not handed
    to the check (it said so with an internal error before)."""
    import logging
    cb = LrwatchCallback(trace=str(tmp_path / "t.jsonl"), flush_every=5)
    trainer = _OwnLoss(model=_model_no_dropout(), args=_args(tmp_path, max_steps=24),
                       train_dataset=Seqs(2000), data_collator=_collate, callbacks=[cb])
    with caplog.at_level(logging.INFO, logger="lrwatch"):
        trainer.train()
    assert "internal error" not in caplog.text
    assert cb.watcher is not None and cb.watcher.policy.state.probe_steps == 0
    assert not [e for s in read_trace(tmp_path / "t.jsonl") for e in s.events
                if e.get("type") == "start_check"]
    assert trainer.state.global_step == 24


class IgnoresNumItems(GPT2LMHeadModel):
    """Takes ``**kwargs`` (so the Trainer passes num_items_in_batch and sums the micro-batch
    losses) but returns each micro-batch's own mean, as BertForSequenceClassification does."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("num_items_in_batch", None)
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("ignores", [False, True])
def test_the_step_loss_under_accumulation_is_on_the_untrained_loss_scale(
        tmp_path: Path, ignores: bool) -> None:
    """Under gradient accumulation the Trainer hands num_items_in_batch to any model taking
    **kwargs and sums its micro-batch losses. A model that ignores it returns per-batch means,
    and their sum was compared with a per-batch untrained loss: x16 with 16 micro-batches, and
    loss_above_start restarted a healthy run three times. Now the step's loss is the
    micro-batches' mean for such a model, their sum for one that divides by num_items."""
    torch.manual_seed(0)
    model = (IgnoresNumItems if ignores else GPT2LMHeadModel)(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(trace=str(trace), flush_every=5)
    _train(tmp_path, cb, model=model, max_steps=6, gradient_accumulation_steps=4)
    samples = read_trace(trace)
    untrained = samples[0].values["untrained_loss"]
    assert samples[0].values["loss"] == pytest.approx(untrained, rel=0.1)
    assert cb.watcher is not None and cb.watcher.policy.rollbacks == 0


def test_a_tuple_output_is_read_and_a_missing_loss_is_said(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """return_dict=False: the loss leads the tuple (it was not read, so the loss came only
    every logging_steps, the norms after clipping, and no start check ran -- unsaid).
    label_smoothing_factor: the Trainer takes the labels away, the model returns no loss;
    that is said once."""
    class TupleGPT2(GPT2LMHeadModel):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs).to_tuple()

    torch.manual_seed(0)
    model = TupleGPT2(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1,
                                 n_head=2))
    trace = tmp_path / "t.jsonl"
    _train(tmp_path, LrwatchCallback(trace=str(trace), flush_every=5), model=model,
           max_steps=12)
    assert all("loss" in s.values for s in read_trace(trace))
    with caplog.at_level("WARNING", logger="lrwatch"):
        _train(tmp_path, LrwatchCallback(flush_every=5), max_steps=4,
               label_smoothing_factor=0.1)
    assert caplog.text.count("the model's forward returned no loss") == 1
