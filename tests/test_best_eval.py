"""The best evaluated state: kept at evaluation steps, restored by ``{stop: {restore: best}}``.

Real torch, tiny models, CPU. Every check compares tensors exactly (``torch.equal``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions.best import BestEval
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from test_watch import _count_host_conversions  # the no-host-sync instrument

State = dict[str, torch.Tensor]

RULE = """\
version: 1
rules:
  - name: eval_accuracy_low
    metric: eval_accuracy
    detector: threshold
    params: {{below: 0.5}}
    severity: critical
    actions: [alert, {{stop: {{restore: {restore}}}}}]
"""


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm: its running statistics are buffers that change every step and must come back.
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(model: nn.Module, state: State) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _run(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
         evals: dict[int, dict[str, Any]], as_tensor: bool = True) -> dict[int, State]:
    """Train ``steps`` steps, logging ``evals[step]`` after that step; the states evaluated."""
    seen: dict[int, State] = {}
    for i in range(steps):
        loss = _step(model, opt, i)
        step = w.step
        if step in evals:
            seen[step] = _state(model)
            vals = {k: torch.tensor(v) if as_tensor else v for k, v in evals[step].items()}
            w.log(loss=loss, **vals)
        else:
            w.log(loss=loss)
    return seen


def _watcher(model: nn.Module, **kw: Any) -> tuple[lrwatch.Watcher, torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw.setdefault("rules", None)
    return lrwatch.Watcher(model, opt, **kw), opt


# --- keeping it -----------------------------------------------------------------------------------
def test_float_eval_is_judged_at_once() -> None:
    model = _model()
    w, opt = _watcher(model, flush_every=100)
    seen = _run(w, model, opt, 3, {2: {"eval_accuracy": 0.6}}, as_tensor=False)
    # No flush yet (flush_every=100): a Python number is judged on the spot.
    assert w.flushes == 0
    assert w.best_eval == BestEval(2, "eval_accuracy", 0.6, "memory")
    seen.update(_run(w, model, opt, 9, {5: {"eval_accuracy": 0.8}, 8: {"eval_accuracy": 0.7}},
                     as_tensor=False))
    assert w.best_eval is not None and (w.best_eval.step, w.best_eval.value) == (5, 0.8)
    assert not _equal(model, seen[5])
    assert w.restore_best() == w.best_eval
    assert _equal(model, seen[5])
    w.close()


@pytest.mark.parametrize("second, winner", [(0.9, 3), (0.5, 2), (float("nan"), 2)])
def test_tensor_eval_waits_for_the_flush_and_one_pending_copy_merges(second: float,
                                                                    winner: int) -> None:
    model = _model()
    w, opt = _watcher(model, flush_every=5)
    # Two tensor evaluations before the first flush (step 5): one pending copy, merged on the
    # device; the flush keeps the better (NaN never wins).
    seen = _run(w, model, opt, 4, {2: {"eval_accuracy": 0.7}, 3: {"eval_accuracy": second}})
    assert w.best_eval is None and w.best is not None and w.best.pending
    assert len(w.best.pending_values()) == 2
    seen.update(_run(w, model, opt, 1, {}))  # step 5: the flush decides
    assert w.flushes == 1 and not w.best.pending
    assert w.best_eval is not None and w.best_eval.step == winner
    assert w.best.copies == 1  # only the winner reached the host
    w.restore_best()
    assert _equal(model, seen[winner])
    w.close()


def test_float_after_a_pending_tensor_is_compared_in_order() -> None:
    model = _model()
    w, opt = _watcher(model, flush_every=10)
    seen = _run(w, model, opt, 2, {2: {"eval_accuracy": torch.tensor(0.9)}}, as_tensor=False)
    seen.update(_run(w, model, opt, 1, {3: {"eval_accuracy": 0.95}}, as_tensor=False))
    seen.update(_run(w, model, opt, 1, {4: {"eval_accuracy": 0.92}}, as_tensor=False))
    assert w.best_eval is None  # the float joined the pending merge: the tensor is not known yet
    w.flush()
    assert w.best_eval is not None and w.best_eval.step == 3
    assert w.best_eval.value == pytest.approx(0.95)
    w.restore_best()
    assert _equal(model, seen[3])
    w.close()


def _conversions(with_eval: bool) -> list[int]:
    model = _model()
    # guard="off": the path of a non-fused optimizer on a GPU (on the CPU the default guard
    # reads its verdict on the host every step, test_watch.py)
    w, opt = _watcher(model, flush_every=5, rules="training", recovery={"guard": "off"})
    per_step: list[int] = []
    with _count_host_conversions(only_lrwatch=False) as counts:  # SGD converts nothing itself
        for i in range(10):
            loss = _step(model, opt, i)
            if with_eval and i in (1, 2, 6):  # two evaluations before the first flush
                w.log(loss=loss, eval_accuracy=torch.tensor(0.5 + 0.1 * i),
                      eval_loss=torch.tensor(1.0 - 0.05 * i))
            else:
                w.log(loss=loss)
            per_step.append(sum(counts.values()))
    assert w.flushes == 2
    if with_eval:
        assert w.best_eval is not None and w.best_eval.step == 7
    w.close()
    return per_step


def test_tensor_eval_costs_no_host_conversion() -> None:
    """Not between flushes, and not at the flush either: the pending values travel in the
    flush's one transfer."""
    plain, evals = _conversions(False), _conversions(True)
    assert evals == plain
    assert evals[:4] == [0, 0, 0, 0] and 1 <= evals[4] <= 2


@pytest.mark.parametrize("keep_best, mode, logged, metric, best_step", [
    (True, "auto", ("eval_loss",), "eval_loss", 2),             # only eval_loss: lower wins
    (True, "auto", ("eval_loss", "eval_accuracy"), "eval_accuracy", 3),  # accuracy preferred
    ("eval_loss", "auto", ("eval_loss", "eval_accuracy"), "eval_loss", 2),
    ("eval_loss", "max", ("eval_loss",), "eval_loss", 1),
    ("eval_accuracy", "min", ("eval_accuracy",), "eval_accuracy", 1),
    ("val_f1", "auto", ("val_f1",), "val_f1", 3),                # named like a score: max
])
def test_metric_and_mode(keep_best: Any, mode: str, logged: tuple[str, ...], metric: str,
                         best_step: int) -> None:
    series = {"eval_loss": [0.9, 0.4, 0.6], "eval_accuracy": [0.5, 0.6, 0.8],
              "val_f1": [0.5, 0.6, 0.8]}
    model = _model()
    w, opt = _watcher(model, keep_best=keep_best, keep_best_mode=mode)
    evals = {s: {m: series[m][s - 1] for m in logged} for s in (1, 2, 3)}
    seen = _run(w, model, opt, 4, evals, as_tensor=False)
    assert w.best_eval is not None
    assert (w.best_eval.metric, w.best_eval.step) == (metric, best_step)
    w.restore_best()
    assert _equal(model, seen[best_step])
    w.close()


def test_keep_best_false_keeps_nothing() -> None:
    model = _model()
    w, opt = _watcher(model, keep_best=False)
    _run(w, model, opt, 4, {2: {"eval_accuracy": 0.9}, 3: {"eval_loss": 0.1}})
    before = _state(model)
    assert w.best is None and w.best_eval is None
    assert w.restore_best() is None and _equal(model, before)
    assert w.state_dict()["best"] is None
    w.close()


def test_no_eval_logged_keeps_nothing() -> None:
    model = _model()
    w, opt = _watcher(model, flush_every=2)
    _run(w, model, opt, 6, {3: {"accuracy": 0.9}})
    w.close()
    assert w.best is not None and w.best.copies == 0 and w.best_eval is None
    assert w.best.metric is None  # auto: nothing picked until an evaluation is seen


def test_bad_settings_list_the_choices(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="keep_best must be True"):
        lrwatch.Watcher(model, opt, keep_best=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\['auto', 'max', 'min'\]"):
        lrwatch.Watcher(model, opt, keep_best_mode="highest")
    with pytest.raises(ConfigError, match="needs a metric name"):
        lrwatch.Watcher(model, opt, keep_best_mode="max")
    with pytest.raises(ConfigError, match="keep_best_mode='max' or 'min'"):
        lrwatch.Watcher(model, opt, keep_best="eval_widgets")
    bad = tmp_path / "bad.yml"
    bad.write_text(RULE.format(restore="bset"))
    with pytest.raises(ConfigError, match=r"bad.yml:3: rule 'eval_accuracy_low': stop: restore "
                                          r"'bset' is not valid \(valid choices: best, "
                                          r"last_good, none\)"):
        lrwatch.Watcher(model, opt, rules=bad)
    good = tmp_path / "good.yml"
    good.write_text(RULE.format(restore="best"))
    with pytest.raises(ConfigError, match="keep_best=True or a metric name"):
        lrwatch.Watcher(model, opt, rules=good, keep_best=False)


def test_kept_under_snapshot_dir(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    model = _model()
    w, opt = _watcher(model, flush_every=3, recovery={"snapshot_dir": str(snaps)})
    seen = _run(w, model, opt, 9, {2: {"eval_accuracy": 0.5}, 5: {"eval_accuracy": 0.8},
                                   8: {"eval_accuracy": 0.6}})
    w.close()
    path = snaps / "best-eval.pt"
    assert w.best_eval == BestEval(5, "eval_accuracy", pytest.approx(0.8), str(path))
    assert w.best is not None and w.best._state is None  # on disk, not in memory
    assert sorted(p.name for p in snaps.glob("best-eval*")) == ["best-eval.json", "best-eval.pt"]
    meta = json.loads((snaps / "best-eval.json").read_text())
    assert meta["step"] == 5 and meta["metric"] == "eval_accuracy"
    w.restore_best()
    assert _equal(model, seen[5])
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # corrupt: refused, never loaded
    with pytest.raises(OSError, match="corrupt"):
        w.restore_best()


# --- stop restores it -----------------------------------------------------------------------------
EVALS = {3: 0.6, 6: 0.9, 9: 0.7, 12: 0.3}


def _stopped_run(tmp_path: Path, restore: str, *, as_tensor: bool = True,
                 **kw: Any) -> tuple[lrwatch.Watcher, nn.Module, dict[int, State], State]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules = tmp_path / "rules.yml"
    rules.write_text(RULE.format(restore=restore))
    model = _model()
    initial = _state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = lrwatch.Watcher(model, opt, rules=rules, flush_every=4, trace=tmp_path / "t.jsonl",
                        **kw)
    seen: dict[int, State] = {}
    for i in w.batches(range(40)):
        loss = _step(model, opt, i)
        if w.step in EVALS:
            seen[w.step] = _state(model)
            v = EVALS[w.step]
            w.log(loss=loss, eval_accuracy=torch.tensor(v) if as_tensor else v)
        else:
            w.log(loss=loss)
    w.close()
    return w, model, seen, initial


@pytest.mark.parametrize("as_tensor", [True, False])
def test_rule_stop_restores_the_best_evaluated_state(tmp_path: Path, as_tensor: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    w, model, seen, _ = _stopped_run(tmp_path, "best", as_tensor=as_tensor)
    assert w.should_stop and w.exit_status == 3 and w.step == 12
    assert w.best_eval is not None and w.best_eval.step == 6
    assert _equal(model, seen[6])
    assert not _equal(model, seen[12])
    note = "restored the best evaluated state of step 6 (eval_accuracy=0.9)"
    assert note in caplog.text   # the stop line, on the lrwatch logger
    events = [e for s in read_trace(tmp_path / "t.jsonl") for e in s.events
              if e.get("type") == "stop"]
    assert len(events) == 1
    assert events[0]["restore"] == "best" and events[0]["message"] == note


def test_stop_without_a_best_state_falls_back_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The watched metric (eval_loss) is never logged: nothing to restore.
    w, model, seen, _ = _stopped_run(tmp_path, "best", keep_best="eval_loss")
    assert w.exit_status == 3 and w.best_eval is None
    assert _equal(model, seen[12])  # stopped as it was, as without restore
    assert "no best evaluated state was kept, so none was restored" in caplog.text


def test_stop_restore_last_good_and_none(tmp_path: Path) -> None:
    # Nothing after the start is known good yet (good_after=100): last_good is the initial state.
    w, model, seen, initial = _stopped_run(tmp_path / "a", "last_good",
                                           recovery={"good_after": 100})
    assert w.exit_status == 3 and _equal(model, initial)
    w, model, seen, _ = _stopped_run(tmp_path / "b", "none")
    assert w.exit_status == 3 and _equal(model, seen[12])


def test_decision_carries_the_rule_action_params() -> None:
    from types import SimpleNamespace as E

    from lrwatch.actions.policy import PolicyState, RecoveryConfig, decide

    ev = [E(rule="r", step=5, kind="firing", actions=("alert", "stop"))]
    out = decide(ev, 5, PolicyState(), RecoveryConfig(), {"r": {"stop": {"restore": "best"}}})
    assert [(d.action, dict(d.params)) for d in out] == [("alert", {}),
                                                         ("stop", {"restore": "best"})]
    out = decide(ev, 5, PolicyState(), RecoveryConfig())
    assert out[-1].action == "stop" and dict(out[-1].params) == {}


# --- resume ---------------------------------------------------------------------------------------
def test_state_dict_round_trip_on_disk(tmp_path: Path) -> None:
    model = _model()
    w, opt = _watcher(model, recovery={"snapshot_dir": str(tmp_path)})
    seen = _run(w, model, opt, 6, {2: {"eval_accuracy": 0.7}, 4: {"eval_accuracy": 0.6}})
    w.close()
    saved = json.loads(json.dumps(w.state_dict()))  # what a checkpoint carries
    assert saved["best"]["best"]["step"] == 2

    model2 = _model(seed=1)
    w2, opt2 = _watcher(model2, recovery={"snapshot_dir": str(tmp_path)})
    w2.load_state_dict(saved)
    assert w2.best_eval == w.best_eval
    assert w2.restore_best() == w.best_eval
    assert _equal(model2, seen[2])
    # It keeps competing: a worse evaluation after the resume does not replace it.
    _run(w2, model2, opt2, 2, {w2.step + 1: {"eval_accuracy": 0.65}}, as_tensor=False)
    assert w2.best_eval == w.best_eval
    w2.close()


def test_state_dict_round_trip_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    model = _model()
    w, opt = _watcher(model)
    _run(w, model, opt, 3, {2: {"eval_loss": 0.3}}, as_tensor=False)
    w.close()
    saved = json.loads(json.dumps(w.state_dict()))
    model2 = _model(seed=1)
    w2, opt2 = _watcher(model2)
    with caplog.at_level(logging.INFO, logger="lrwatch"):
        w2.load_state_dict(saved)
    # The tensors lived in the old process: the bookkeeping says so and tracking starts afresh,
    # on the same metric.
    assert "gone after the resume" in caplog.text
    assert w2.best_eval is None and w2.best is not None and w2.best.metric == "eval_loss"
    seen = _run(w2, model2, opt2, 2, {w2.step + 1: {"eval_loss": 0.5}}, as_tensor=False)
    assert w2.best_eval is not None and w2.best_eval.value == 0.5
    w2.restore_best()
    assert _equal(model2, next(iter(seen.values())))
    w2.close()


# --- framework adapters ---------------------------------------------------------------------------
@pytest.mark.slow
def test_lightning_stop_restores_the_best(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lrwatch.integrations.lightning import LrwatchCallback

    accs = iter([0.6, 0.9, 0.7, 0.3, 0.8, 0.8, 0.8, 0.8])
    seen: dict[int, State] = {}

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()
            self.acc = 0.0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_validation_epoch_start(self) -> None:
            self.acc = next(accs)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_acc", torch.tensor(self.acc))

        def on_validation_epoch_end(self) -> None:
            seen[self.trainer.global_step] = _state(self.net)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(640, 6, generator=g),
                                        torch.randint(0, 3, (640,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    rules = tmp_path / "rules.yml"
    rules.write_text(RULE.format(restore="best"))
    cb = LrwatchCallback(rules=str(rules), flush_every=1)
    module = Tiny()
    trainer = pl.Trainer(max_steps=40, val_check_interval=5, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader, loader)
    # the stop trains no further batch (the module's on_train_batch_start returns -1 once,
    # since the twelfth round's audit: Lightning ran the batch in progress before): the run
    # ends at the stop's step on the best evaluated state
    assert cb.exit_status == 3 and trainer.global_step == 20, (trainer.global_step, sorted(seen))
    assert cb.watcher is not None and cb.watcher.best_eval is not None
    assert cb.watcher.best_eval.step == 10
    assert _equal(module.net, seen[10])
    assert not _equal(module.net, seen[20])      # the state at the stop was left


@pytest.mark.slow
def test_transformers_stop_restores_the_best(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from lrwatch.integrations.transformers import LrwatchCallback

    class Seqs(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, n: int, seed: int = 0) -> None:
            self.starts = torch.randint(0, 32, (n,), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.starts)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (self.starts[i] + torch.arange(16)) % 32
            return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1,
                                       n_head=2))
    accs = iter([0.6, 0.9, 0.7, 0.3, 0.8, 0.8, 0.8, 0.8])
    seen: dict[int, State] = {}
    trainer: Any = None

    def metrics(_: Any) -> dict[str, float]:  # runs on the evaluated model
        seen[trainer.state.global_step] = _state(model)
        return {"accuracy": next(accs)}

    rules = tmp_path / "rules.yml"
    rules.write_text(RULE.format(restore="best"))
    cb = LrwatchCallback(rules=str(rules), flush_every=1)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=3e-3, max_steps=40,
                             eval_strategy="steps", eval_steps=5, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Seqs(1000),
                      eval_dataset=Seqs(8, seed=1), compute_metrics=metrics, callbacks=[cb])
    trainer.train()
    assert cb.exit_status == 3
    assert trainer.state.global_step == 21  # the Trainer finishes the step in progress
    assert cb.watcher is not None and cb.watcher.best_eval is not None
    assert cb.watcher.best_eval.step == 10
    assert _equal(model, seen[10])
