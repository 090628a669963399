"""The sudden-failure watch (``RecoveryConfig.sudden_hold``) in real runs: the defects the
eleventh round's audit left (docs/recovery.md, "Defects found by the eleventh round's audit",
and the watch's leftovers after it) -- a resume during a watch, a ``skip`` during a watch, a
rollback request during a watch in a rate cut's cooldown."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import lrwatch
from flag_rules import flag_rule, flag_rules
from lrwatch.exporters.trace import read_trace
from lrwatch.recovery.policy import EXIT_BUDGET

_RULES = flag_rules(flag_rule("poisoned", "poison"),
                    flag_rule("blowup", "blow", hysteresis=3),
                    flag_rule("spike", "spike"),
                    flag_rule("undo", "undo", ["skip"], severity="warning"),
                    flag_rule("nudge", "nudge", ["reduce_lr"], severity="warning"))
_EXTRA = ("poison", "blow", "spike", "undo", "nudge")


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


class _Run:
    """A quiet, healthy run on a tiny model; ``extra(step, events so far)`` gives the metrics
    logged besides the loss (``poison``, ``spike``, ``undo``, ``nudge``). ``checkpoint()``
    keeps what a training script saves (model, optimizer, ``Watcher.state_dict``);
    ``resume(ckpt)`` starts a new process's run from it (a new model, optimizer and Watcher)."""

    def __init__(self, tmp_path: Path, flush_every: int,
                 extra: Callable[[int, list[dict[str, Any]]], dict[str, float]],
                 recovery: dict[str, Any] | None = None) -> None:
        self.tmp, self.flush_every, self.extra = tmp_path, flush_every, extra
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "rules.yml").write_text(_RULES)
        self.rec = {"good_after": 5, "min_interval": 6, "max_interval": 6, "cooldown": 0, "guard": "off",
                    "sudden_hold": 5, **(recovery or {})}
        self.events: list[dict[str, Any]] = []
        self.traces: list[Path] = []
        torch.manual_seed(0)
        self._start()

    def _start(self) -> None:
        self.model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        trace = self.tmp / f"trace{len(self.traces)}.jsonl"
        self.traces.append(trace)
        self.w = lrwatch.Watcher(
            self.model, self.opt, flush_every=self.flush_every, trace=trace,
            rules=str(self.tmp / "rules.yml"), recovery=self.rec,
            listeners=[lambda s: self.events.extend(
                {**e, "line": s.step} for e in s.events
                if e.get("type") not in ("firing", "resolved"))])

    def train(self, until: int) -> "_Run":
        w, model, opt = self.w, self.model, self.opt
        while w.step < until and not w.should_stop:
            step = w.step + 1
            more = self.extra(step, self.events)
            x, y = _data(step - 1)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            w.log(loss=loss.detach(), **{k: more.get(k, 0.0) for k in _EXTRA})
        return self

    def checkpoint(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(),
                              "optimizer": self.opt.state_dict(),
                              "lrwatch": self.w.state_dict()})

    def resume(self, ckpt: dict[str, Any]) -> "_Run":
        """The process died (its Watcher is never closed); a new one resumes from ``ckpt``."""
        self._start()
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.w.load_state_dict(ckpt["lrwatch"])
        return self

    def close(self) -> "_Run":
        self.w.close()
        return self

    def traced(self, *types: str) -> list[dict[str, Any]]:
        """The events of ``types`` in the last trace, with the line they are on."""
        return [{**e, "line": s.step} for s in read_trace(self.traces[-1]) for e in s.events
                if e.get("type") in types]


def _rolled_back(events: list[dict[str, Any]]) -> bool:
    return any(e["type"] == "rollback" for e in events)


# --- a resume during a watch ---------------------------------------------------------------

def _poisoned_until_rolled_back(step: int, events: list[dict[str, Any]]) -> dict[str, float]:
    """The poisoned rule fires from step 20 until the run is rolled back: a watched failure
    that is still firing when its hold ends."""
    return {"poison": float(step >= 20 and not _rolled_back(events))}


def test_uninterrupted_the_watch_rolls_back_before_the_failure(tmp_path: Path) -> None:
    """The reference of the resume tests below: the same run, not interrupted, rolls back to
    a snapshot at least ``sudden_margin`` steps before the failure when its hold ends."""
    r = _Run(tmp_path, 1, _poisoned_until_rolled_back).train(40).close()
    (rb,) = r.traced("rollback")
    assert rb["step"] == 20 and rb["to_step"] <= 10 and rb["lr_factor"] == 1.0
    assert r.w.policy.rollbacks == 1 and not r.w.should_stop


def test_a_resume_during_a_watch_without_the_snapshot_before_it_does_not_book_a_rollback_that_undoes_nothing(  # noqa: E501
        tmp_path: Path) -> None:
    """A checkpoint written two steps into a watch, the run resumed from it in a new process
    (snapshots in memory: the one before the failure died with the process): when the hold
    ends with the rule still firing, a rollback could only go to the resume point (step 22),
    after the failure: it would undo nothing, keep the rate, and spend the budget. The run
    stops instead, as it does where no snapshot is held, and says why."""
    r = _Run(tmp_path, 1, _poisoned_until_rolled_back).train(22)
    assert [e["type"] for e in r.events] == ["watch"]
    r.resume(r.checkpoint()).train(40).close()
    assert not r.traced("rollback"), r.traced("rollback")
    (stop,) = r.traced("stop")
    assert stop["step"] == 20 and "resume" in stop["reason"] and "step 22" in stop["reason"]
    assert r.w.policy.rollbacks == 0
    assert r.w.should_stop and r.w.exit_status == EXIT_BUDGET


def test_a_resume_during_a_watch_rolls_back_before_the_failure_from_snapshot_dir(
        tmp_path: Path) -> None:
    """The same, with snapshots on disk (``snapshot_dir``): the checkpoint names the snapshot
    before the failure, and the resumed run rolls back to it, as the run that was not
    interrupted does."""
    r = _Run(tmp_path, 1, _poisoned_until_rolled_back,
             {"snapshot_dir": str(tmp_path / "snaps")}).train(22)
    r.resume(r.checkpoint()).train(40).close()
    (rb,) = r.traced("rollback")
    assert rb["step"] == 20 and rb["to_step"] <= 10 and rb["lr_factor"] == 1.0, rb
    assert r.w.policy.rollbacks == 1 and not r.w.should_stop


def test_a_rollback_the_cooldown_held_across_a_resume_is_not_a_rollback_to_the_resume_point(
        tmp_path: Path) -> None:
    """Not the watch's own, the same code path: a failure held by the cooldown of an earlier
    rollback, the checkpoint written while it is held, the run resumed in a new process. At
    the cooldown's end the only snapshot is the resume point, after the failure: no rollback
    to it (it would undo nothing but cut the rate); the run stops and says why."""
    def extra(step: int, events: list[dict[str, Any]]) -> dict[str, float]:
        return {"poison": float(20 <= step <= 22), "spike": float(step >= 30)}

    r = _Run(tmp_path, 1, extra, {"cooldown": 20, "sudden_hold": 0}).train(32)
    assert r.w.policy.held == "spike" and r.w.policy.rollbacks == 1
    r.resume(r.checkpoint()).train(60).close()
    assert [e["type"] for e in r.traced("rollback", "stop")] == ["stop"], r.traced("rollback")
    assert r.w.policy.rollbacks == 1 and r.w.exit_status == EXIT_BUDGET
    assert "step 32" in r.traced("stop")[0]["reason"]


def test_a_rollback_the_cooldown_held_across_a_resume_goes_where_it_would_have_from_snapshot_dir(
        tmp_path: Path) -> None:
    """The held rollback of the test above, snapshots on disk: the checkpoint names the ones
    from before the failure, and the resumed run rolls back where the run that was not
    interrupted does, with the same cut."""
    def extra(step: int, events: list[dict[str, Any]]) -> dict[str, float]:
        live = sum(e["type"] == "rollback" for e in events) < 2
        return {"poison": float(20 <= step <= 22), "spike": float(step >= 30 and live)}

    rec = {"cooldown": 20, "sudden_hold": 0}
    ref = _Run(tmp_path / "ref", 1, extra, rec).train(60).close()
    r = _Run(tmp_path / "res", 1, extra, {**rec, "snapshot_dir": str(tmp_path / "snaps")})
    r.train(32).resume(r.checkpoint()).train(60).close()
    want = [(e["rule"], e["to_step"], e["lr_factor"]) for e in ref.traced("rollback")][-1:]
    got = [(e["rule"], e["to_step"], e["lr_factor"]) for e in r.traced("rollback")]
    assert want and want[0][0] == "spike" and want[0][1] < 30 and got == want, (got, want)
    assert not r.w.should_stop


# --- a skip during a watch -----------------------------------------------------------------

def test_a_skip_that_undoes_the_watched_failure_ends_the_watch_without_a_rollback(
        tmp_path: Path) -> None:
    """A one-step blow-up at step 20 (its rule resolves after three normal steps), watched; a
    ``skip`` rule at step 21 undoes the steps back to the snapshot of step 18, before the
    failure. The engine is put back there, where the blow-up never fired, so no ``resolved``
    for it ever comes: before, the watch ended at its hold with a rollback (to step 6) of a
    failure the skip had already undone. The watch ends at the skip now, without one."""
    # (snapshots every 6 steps: 0, 6, 12, 18, 24, ...)
    r = _Run(tmp_path, 1, lambda s, ev: {"blow": float(s == 20), "undo": float(s == 21)},
             ).train(40).close()
    seen = r.traced("watch", "skip", "recovered", "rollback")
    assert seen[1]["type"] == "skip" and seen[1]["to_step"] < 20, seen
    assert [e["type"] for e in seen] == ["watch", "skip", "recovered"], seen
    assert seen[2]["line"] == 21 and "skip" in seen[2]["reason"], seen
    assert r.w.policy.rollbacks == 0 and r.w.policy.state.watching is None


def test_a_skip_back_to_after_the_watched_failure_leaves_the_watch_to_its_rule(
        tmp_path: Path) -> None:
    """The skip goes back to a snapshot after the failure (step 24): the failure is not
    undone, and the watch ends as its rule says: it resolved, the run goes on
    (``recovered``, at the first flush after the hold without another control plan)."""
    r = _Run(tmp_path, 1, lambda s, ev: {"blow": float(20 <= s <= 22), "undo": float(s == 25)},
             ).train(40).close()
    seen = r.traced("watch", "skip", "recovered", "rollback")
    assert [e["type"] for e in seen] == ["watch", "skip", "recovered"], seen
    assert seen[1]["to_step"] >= 20 and seen[2]["line"] >= 25, seen


# --- a rollback request during a watch, in a rate cut's cooldown ---------------------------

def test_a_rollback_asked_for_during_a_watch_after_a_rate_cut_goes_before_the_failure(
        tmp_path: Path) -> None:
    """A watched failure at step 20 (still firing), a ``reduce_lr`` at 21 (its cooldown: 20
    steps), and another rule asking for a rollback at 22: the watched failure's rollback is
    due since step 20, before the cut (it is not held by the cut's cooldown, as it is not at
    the hold's end), and goes to the snapshot before the failure's onset, the rate kept, as
    it would have at once -- not, 20 steps later, to the newest good snapshot with a cut."""
    def extra(step: int, events: list[dict[str, Any]]) -> dict[str, float]:
        live = not _rolled_back(events)
        return {"poison": float(step >= 20 and live), "nudge": float(step == 21),
                "spike": float(step >= 22 and live)}

    r = _Run(tmp_path, 1, extra, {"cooldown": 20}).train(60).close()
    (rb,) = r.traced("rollback")
    assert rb["rule"] == "poisoned" and rb["step"] == 20, rb
    assert rb["to_step"] <= 10 and rb["lr_factor"] == 1.0, rb
    assert rb["line"] <= 23, rb


# --- a skip or a rate cut asked for in the flush that starts a watch ----------------------

def test_a_skip_asked_for_in_the_flush_that_starts_a_watch_is_carried_out(
        tmp_path: Path) -> None:
    """A ``skip`` rule firing at the step of a sudden failure: the watch is no control plan,
    so the skip is carried out (before, it was dropped: a rollback outranks a skip, but no
    rollback came, and a rule fires once, so the skip was never done). It goes back to the
    snapshot of step 18, before the failure, which ends the watch."""
    r = _Run(tmp_path, 1, lambda s, ev: {"poison": float(s == 20), "undo": float(s == 20)},
             ).train(40).close()
    seen = r.traced("watch", "skip", "recovered", "rollback")
    assert [e["type"] for e in seen] == ["watch", "skip", "recovered"], seen
    assert seen[1]["to_step"] == 18 and {e["line"] for e in seen} == {20}, seen
    assert r.w.policy.skips == 1 and r.w.policy.rollbacks == 0


def test_a_rate_cut_asked_for_in_the_flush_that_starts_a_watch_is_carried_out(
        tmp_path: Path) -> None:
    """The same for ``reduce_lr``: the cut is taken (it was dropped), and the watch goes on
    to its end (the poisoned rule resolved: ``recovered``)."""
    r = _Run(tmp_path, 1, lambda s, ev: {"poison": float(s == 20), "nudge": float(s == 20)},
             ).train(40).close()
    seen = r.traced("watch", "reduce_lr", "recovered", "rollback")
    assert [e["type"] for e in seen] == ["watch", "reduce_lr", "recovered"], seen
    assert r.w.policy.lr_scale == 0.5 and r.w.policy.rollbacks == 0
    assert r.opt.param_groups[0]["lr"] == 0.05
