"""Self-healing benchmark (issue 4): do diverging runs finish healthy with lrwatch's rollback on?

A sweep of real training configurations (models, optimizers, schedules, learning rates, seeds,
mid-run learning-rate faults) is trained *bare* first; only the candidates whose bare run really
diverges are kept (the count of candidates and of diverged ones is reported). Every kept
configuration is then trained again

``lrwatch``
    with a :class:`~lrwatch.watch.Watcher` on its defaults -- ``rules="training"`` and the default
    :class:`~lrwatch.actions.policy.RecoveryConfig` (rollback to the last known-good snapshot with
    the learning rate x0.5, at most 5 rollbacks) -- and ``flush_every=FLUSH_EVERY``. The loop is
    ``for batch in watch.batches(stream)``, ``watch.log(loss=...)`` once per step after
    ``opt.step(); sched.step()`` (plus held-out ``eval_loss``/``eval_accuracy`` every
    ``EVAL_EVERY`` steps, as a user would log them). The run is done when the scheduler reaches the
    step budget (after a rollback the restored scheduler resumes from the snapshot's step) or when
    ``watch.should_stop`` ends the loop; executed steps are capped at ``STEP_CAP`` x the budget.
``lrwatch <extra>``
    (reported in its own, clearly labelled column; never in the headline) the same with one
    non-default recovery setting, to show what a different rollback policy would change.

The two *anchors* are read off the bare run (the run is deterministic, so a stopped run is the
bare run cut at the stop): ``stop on NaN`` is Keras ``TerminateOnNaN`` (stop after the first batch
whose loss is non-finite) and ``stop on spike`` is Lightning ``SpikeDetection(window=10,
rtol=2)`` (both from ``benchmarks/anchors.py``). The model as it is at the stop is their result.

Each task has a *healthy reference* (:func:`reference_sweep`): a learning-rate sweep (two
optimizers x five learning rates, warm-up + cosine schedule, the same step budget, seed 0); the
three best finite runs are repeated with seeds 1 and 2 and the best mean over the three seeds is
the reference score. A run *finishes healthy* when its final held-out evaluation is finite
and within ``TOLERANCE`` (2 points) of the reference: accuracy points for classification,
R^2 points (share of the held-out target variance explained, x100) for regression.

Candidates (:func:`candidates`) are too-high learning rates (constant, warm-up-less cosine,
cyclical) and mid-run LR faults injected into the task's reference configuration.
Divergence of a bare run (the selection criterion): a non-finite loss or parameter; or the
final-loss blow-up of the detection benchmark's labeller (final loss above the initial loss and
above 4x the best smoothed loss, ``detection_runs.label_natural``); or a loss excursion above 3x
its running minimum (the labeller's "large excursion") after which the held-out score ends more
than ``TOLERANCE`` below the reference (an accuracy collapse).

Overhead: on healthy configurations, the same run with and without the Watcher (defaults,
snapshots included) is trained side by side in blocks of ``OVERHEAD_BLOCK`` steps, interleaved in
a seeded random order per round; the overhead is the ratio of the median per-step times (process
CPU time, robust to other jobs on a shared machine; wall clock reported too), with a paired
bootstrap 95% interval.

Usage::

    python benchmarks/recovery.py                # full sweep (about 4-7 minutes on 2 cores)
    python benchmarks/recovery.py --quick        # two tasks (about 1 minute)
    python benchmarks/recovery.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import detection_runs as dr  # noqa: E402
from benchmarks.anchors import KerasTerminateOnNaN, LightningSpikeDetection  # noqa: E402
from lrwatch.actions.policy import RecoveryConfig  # noqa: E402
from lrwatch.actions.snapshot import restore_state  # noqa: E402
from lrwatch.samples import Sample  # noqa: E402
from lrwatch.watch import Watcher  # noqa: E402
import lrwatch  # noqa: E402

__all__ = ["Config", "PROBLEMS", "TASKS", "QUICK_TASKS", "candidates", "get_problem",
           "run_bare", "run_lrwatch", "diverged", "healthy", "reference_sweep", "overhead_ab",
           "run", "main"]

TOLERANCE = 0.02        # 2 accuracy points / 2 R^2 points
EVAL_EVERY = 20         # held-out evaluation logged to the Watcher every K schedule steps
FLUSH_EVERY = 10        # the demo's value; the Watcher default is 25 (see docs/recovery.md)
STEP_CAP = 3            # executed optimizer steps at most STEP_CAP x the step budget
OVERHEAD_BLOCK = 25     # steps per timed block: one flush of the default flush_every (25)
TARGET_HEALTHY = 0.80   # issue 4: >= 80% of the diverging runs finish healthy
TARGET_OVERHEAD = 1.03  # issue 4: <= 3% total overhead on healthy runs
#: The non-default recovery of the extra column (the headline always uses the defaults).
EXTRA_RECOVERY: dict[str, Any] = {"lr_factor": 0.1}

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------

class Problem:
    """One task: fixed held-out split, a model factory, a seeded batch stream, an evaluation."""

    name: str
    model_desc: str
    metric: str              # "accuracy" | "r2"
    steps: int               # step budget of one run
    base_lr: dict[str, float]
    realistic: bool = False  # model large enough for the overhead target to apply

    def build(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, seed: int) -> Iterator[Batch]:
        raise NotImplementedError

    def eval_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Held-out ``eval_loss`` (and ``eval_accuracy``) as 0-d tensors (no host sync)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``score`` (accuracy or R^2; NaN when the model's outputs are not finite) and loss."""
        raise NotImplementedError


class TabularProblem(Problem):
    def __init__(self, name: str, dr_task: str, metric: str, steps: int = 400,
                 hidden: tuple[int, ...] | None = None, batch: int | None = None,
                 realistic: bool = False) -> None:
        task = dr.TASKS[dr_task]
        self.name, self.metric, self.steps, self.realistic = name, metric, steps, realistic
        self.hidden = hidden if hidden is not None else task.hidden
        self.batch = batch or task.batch
        self.task = dr.Task(name, task.data, self.hidden, self.batch, steps)
        self.data = dr.load_data(task, 0)      # one fixed split for every seed: one reference
        d_out = self.data.n_classes if self.data.classification else 1
        if self.data.kind == "chars":
            hid = self.hidden[0] if self.hidden else 128
            self.model_desc = f"char MLP ({self.data.context}x16 emb)-{hid}-{d_out}"
        else:
            d_in = self.data.x_train.shape[1]
            dims = "-".join(str(d) for d in (d_in, *(self.hidden or ()), d_out))
            self.model_desc = f"{'MLP' if self.hidden else 'linear'} {dims}"
        self.base_lr = dict(dr.BASE_LR)
        self.x_eval = dr._eval_inputs(self.data)
        self.y_eval = self.data.y_test
        if not self.data.classification:
            self.sst = float(((self.y_eval - self.y_eval.mean()) ** 2).sum())

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return dr.build_model(self.task, self.data)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.data.classification:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def stream(self, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(3000 + seed)
        n = len(self.data.x_train)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - self.batch + 1, self.batch):
                yield dr._batch(self.data, perm[i:i + self.batch])

    def eval_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.x_eval)
            res = {"eval_loss": self.loss(out, self.y_eval)}
            if self.data.classification:
                res["eval_accuracy"] = (out.argmax(1) == self.y_eval).float().mean()
        model.train(was)
        return res

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        t = self.eval_tensors(model)
        loss = float(t["eval_loss"])
        if not math.isfinite(loss):
            return {"score": math.nan, "loss": loss}
        score = float(t["eval_accuracy"]) if self.data.classification else \
            1.0 - loss * len(self.y_eval) / self.sst
        return {"score": score, "loss": loss}


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "digits_mlp": lambda: TabularProblem("digits_mlp", "digits_mlp", "accuracy"),
    "synth_clf_mlp": lambda: TabularProblem("synth_clf_mlp", "synth_clf_mlp", "accuracy"),
    "chars_mlp": lambda: TabularProblem("chars_mlp", "chars_mlp", "accuracy"),
    "synth_reg_mlp": lambda: TabularProblem("synth_reg_mlp", "synth_reg_mlp", "r2"),
    # Overhead only: a realistically sized model (the `mlp` of benchmarks/overhead.py).
    "digits_wide": lambda: TabularProblem("digits_wide", "digits_mlp", "accuracy",
                                          hidden=(1024, 1024, 1024), batch=128, realistic=True),
}
_PROBLEM_CACHE: dict[str, Problem] = {}


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(PROBLEMS)}")
    if name not in _PROBLEM_CACHE:
        _PROBLEM_CACHE[name] = PROBLEMS[name]()
    return _PROBLEM_CACHE[name]


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

#: Mid-run faults: ``lr_bug`` multiplies the schedule by ``factor`` from schedule step ``at`` on
#: (a bug in the schedule code: it is there again after a rollback); ``lr_bug_once`` multiplies
#: the scheduler's ``base_lrs`` once, the first time the schedule reaches ``at`` (a bad config
#: reload, as ``lrwatch demo --inject lr-bug``: a rollback restores the old ``base_lrs``);
#: ``lr_spike`` runs one step at ``factor`` x the learning rate (a transient glitch).
FAULTS = ("lr_bug", "lr_bug_once", "lr_spike")


@dataclass(frozen=True)
class Config:
    task: str
    optimizer: str           # sgd | momentum | adam | adamw | rmsprop
    schedule: str            # constant | cosine | warmup | step | exponential | cyclical
    lr: float                # peak learning rate (absolute)
    seed: int = 0
    fault: str | None = None
    at: int | None = None
    factor: float = 100.0

    @property
    def id(self) -> str:
        core = f"{self.task}/{self.optimizer}/{self.schedule}/lr{self.lr:g}/s{self.seed}"
        if self.fault:
            core += f"/{self.fault}x{self.factor:g}@{self.at}"
        return core

    @property
    def schedule_desc(self) -> str:
        s = {"warmup": "warmup+cosine", "cosine": "cosine (no warmup)",
             "cyclical": "triangular 0.1-1x, period 100", "step": "step /2 per 100",
             "exponential": "exp 0.995", "constant": "constant"}.get(self.schedule, self.schedule)
        if self.fault == "lr_bug":
            s += f"; bug: x{self.factor:g} from step {self.at}"
        elif self.fault == "lr_bug_once":
            s += f"; base_lrs x{self.factor:g} once at step {self.at}"
        elif self.fault == "lr_spike":
            s += f"; one step x{self.factor:g} at step {self.at}"
        return s


# Candidates. Too-high learning rates: the peak LR is a multiple of the task's tuned LR for that
# optimizer (a constant LR, a warm-up-less cosine, a cyclical schedule whose peaks are too high).
# Mid-run faults are injected into the task's *reference* configuration (the best of the sweep),
# whose unfaulted run is healthy by construction. Seeds rotate through 0..2. Which candidates
# really diverge is decided by running them bare (`diverged`), never assumed.
HIGH_LR: list[tuple[str, str, float]] = [
    # optimizer, schedule, lr multiple
    ("momentum", "constant", 30), ("momentum", "constant", 100), ("sgd", "constant", 100),
    ("adam", "constant", 30), ("adam", "constant", 100), ("rmsprop", "constant", 100),
    ("momentum", "cosine", 30), ("adamw", "cosine", 100),
    ("momentum", "cyclical", 30), ("sgd", "cyclical", 100),
]
FAULT_RUNS: list[tuple[str, int, float]] = [
    # fault, schedule step, factor (in the reference configuration)
    ("lr_bug", 200, 100.0), ("lr_bug", 200, 10.0), ("lr_bug_once", 200, 100.0),
    ("lr_spike", 150, 1000.0),
]
TASKS = ("digits_mlp", "synth_clf_mlp", "chars_mlp", "synth_reg_mlp")
QUICK_TASKS = ("digits_mlp", "synth_reg_mlp")


def candidates(task: str, reference: Config, seed_shift: int = 0) -> list[Config]:
    """The candidate configurations of ``task`` (``reference``: its best sweep configuration).

    ``seed_shift`` moves every seed (0-2 by default) up by that much: the same configurations
    on other initial weights and batch orders, to see how much the result owes to the seeds."""
    problem = get_problem(task)
    i = TASKS.index(task) if task in TASKS else 0
    k = seed_shift
    out = [Config(task, opt, sched, float(f"{problem.base_lr[opt] * mult:.6g}"),
                  (i + j) % 3 + k)
           for j, (opt, sched, mult) in enumerate(HIGH_LR)]
    out += [Config(task, reference.optimizer, reference.schedule, reference.lr,
                   (i + j + 1) % 3 + k, fault, at, factor)
            for j, (fault, at, factor) in enumerate(FAULT_RUNS)]
    return out


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------

def _schedule(cfg: Config, steps: int) -> Callable[[int], float]:
    base = dr._schedule_fn(cfg.schedule, steps)
    if cfg.fault == "lr_bug":
        at, f = int(cfg.at or 0), cfg.factor
        return lambda t: base(t) * (f if t >= at else 1.0)
    return base


def _setup(cfg: Config) -> tuple[Problem, nn.Module, torch.optim.Optimizer, Any]:
    problem = get_problem(cfg.task)
    model = problem.build(cfg.seed)
    opt = dr._optimizer(cfg.optimizer, model, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, problem.steps))
    return problem, model, opt, sched


class _Injector:
    """Applies ``lr_bug_once`` / ``lr_spike`` before the step at schedule step ``at`` (once)."""

    def __init__(self, cfg: Config, opt: torch.optim.Optimizer, sched: Any) -> None:
        self.cfg, self.opt, self.sched = cfg, opt, sched
        self.done = cfg.fault not in ("lr_bug_once", "lr_spike")

    def __call__(self, t: int) -> None:
        if self.done or t != self.cfg.at:
            return
        self.done = True
        f = self.cfg.factor
        if self.cfg.fault == "lr_bug_once":
            self.sched.base_lrs = [b * f for b in self.sched.base_lrs]
        for g in self.opt.param_groups:   # lr_spike: LambdaLR recomputes lr next step
            g["lr"] *= f


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_bare(cfg: Config, *, anchors: bool = True) -> dict[str, Any]:
    """Train ``cfg`` without lrwatch; the anchors watch the same run and record their stop."""
    problem, model, opt, sched = _setup(cfg)
    inject = _Injector(cfg, opt, sched)
    watchers = {"nan_stop": KerasTerminateOnNaN(), "spike_stop": LightningSpikeDetection()} \
        if anchors else {}
    stops: dict[str, dict[str, Any]] = {}
    samples: list[Sample] = []
    first_nonfinite: int | None = None
    ended_at = problem.steps
    t0 = time.perf_counter()
    stream = problem.stream(cfg.seed)
    for step in range(1, problem.steps + 1):
        x, y = next(stream)
        inject(sched.last_epoch)
        loss = problem.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        s = Sample(step=step, values={"loss": lv})
        samples.append(s)
        for name, a in watchers.items():
            if name not in stops and a.update(s):
                stops[name] = {"stop_step": step, **problem.evaluate(model)}
        if first_nonfinite is None and not math.isfinite(lv):
            first_nonfinite = step
        if first_nonfinite is not None and not _finite_params(model):
            ended_at = step   # NaN weights never come back: the final model is this one
            break
    final = problem.evaluate(model)
    label = dr.label_natural(samples)
    for name in watchers:
        if name not in stops:   # never fired: the anchor's run is the bare run
            stops[name] = {"stop_step": None, **final}
    return {"final": final, "first_nonfinite": first_nonfinite, "ended_at": ended_at,
            "label": {k: label[k] for k in ("label", "reason", "initial_loss", "final_loss",
                                            "best_smoothed_loss", "largest_excursion_ratio")},
            "anchors": stops, "seconds": time.perf_counter() - t0}


def run_lrwatch(cfg: Config, *, recovery: Any = True, flush_every: int = FLUSH_EVERY,
                log_eval: bool = True) -> dict[str, Any]:
    """Train ``cfg`` with a Watcher (default rules; ``recovery`` as given, defaults by default)."""
    problem, model, opt, sched = _setup(cfg)
    inject = _Injector(cfg, opt, sched)
    actions: list[dict[str, Any]] = []

    def listen(s: Sample) -> None:
        for e in s.events:
            if e.get("type") in ("rollback", "skip", "reduce_lr", "stop"):
                actions.append({k: e.get(k) for k in ("type", "rule", "step", "to_step",
                                                      "reason")})

    t0 = time.perf_counter()
    budget = problem.steps
    watch = Watcher(model, opt, sched, flush_every=flush_every, rules="training",
                    recovery=recovery, listeners=[listen], run_name=cfg.id)
    with watch:
        for x, y in watch.batches(problem.stream(cfg.seed)):
            t = sched.last_epoch
            if t >= budget or watch.step >= STEP_CAP * budget:
                break
            inject(t)
            loss = problem.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            metrics = {"loss": loss.detach()}
            if log_eval and (t + 1) % EVAL_EVERY == 0:
                metrics.update(problem.eval_tensors(model))
            watch.log(**metrics)
    final = problem.evaluate(model)
    res: dict[str, Any] = {
        "final": final, "rollbacks": watch.policy.rollbacks, "executed_steps": watch.step,
        "schedule_step": sched.last_epoch, "stopped": watch.should_stop,
        "exit_status": watch.exit_status, "stop_reason": watch.stop_reason,
        "capped": (not watch.should_stop) and sched.last_epoch < budget,
        "actions": actions, "seconds": time.perf_counter() - t0}
    if watch.should_stop and watch.store is not None:
        # Not lrwatch's behaviour: what the run would be worth had the stop restored the
        # last known-good snapshot (the model it leaves behind is the one it stopped with).
        good = watch.store.latest_good()
        if good is not None:
            restore_state(good.load(), model, opt, sched)
            res["last_good"] = {"step": good.step, **problem.evaluate(model)}
    return res


# --------------------------------------------------------------------------------------------
# judging
# --------------------------------------------------------------------------------------------

def healthy(score: float, ref: float) -> bool:
    return math.isfinite(score) and score >= ref - TOLERANCE - 1e-12


def diverged(bare: dict[str, Any], ref: float) -> tuple[bool, str]:
    """Whether a bare run diverged (the selection criterion), and why."""
    if bare["first_nonfinite"] is not None:
        return True, f"non-finite loss at step {bare['first_nonfinite']}"
    lab = bare["label"]
    if lab["label"] == "diverged":
        return True, "loss blew up and stayed up: " + lab["reason"]
    score = bare["final"]["score"]
    if not math.isfinite(score):
        return True, "non-finite held-out evaluation"
    if lab["largest_excursion_ratio"] >= 3.0 and not healthy(score, ref):
        return True, (f"loss excursion {lab['largest_excursion_ratio']:.3g}x its running "
                      f"minimum, then held-out score {score:.3f} < reference {ref:.3f} - "
                      f"{TOLERANCE:g}")
    return False, lab["reason"]


# --------------------------------------------------------------------------------------------
# reference sweep
# --------------------------------------------------------------------------------------------

REF_OPTIMIZERS = ("momentum", "adam")
REF_MULTS = (0.3, 1.0, 3.0, 10.0, 30.0)
REF_SEEDS = (0, 1, 2)
REF_TOP = 3


def reference_sweep(task: str, *, with_lrwatch: bool = True,
                    optimizers: Sequence[str] = REF_OPTIMIZERS,
                    mults: Sequence[float] = REF_MULTS, top_n: int = REF_TOP,
                    progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The task's healthy reference: an LR sweep on the warm-up + cosine schedule.

    Every optimizer x LR multiple runs with seed 0; the ``REF_TOP`` best finite ones run again
    with the other ``REF_SEEDS``; the configuration with the best mean held-out score is the
    reference configuration, and that mean is the reference score (so seed noise of a healthy
    run sits on both sides of it). With ``with_lrwatch`` every finite seed-0 sweep run is also
    trained with the Watcher (defaults): does lrwatch act on healthy runs, and what does it cost?
    """
    problem = get_problem(task)
    runs: list[tuple[Config, dict[str, Any]]] = []
    for opt in optimizers:
        for mult in mults:
            cfg = Config(task, opt, "warmup", float(f"{problem.base_lr[opt] * mult:.6g}"), 0)
            bare = run_bare(cfg, anchors=False)
            finite = bare["first_nonfinite"] is None and math.isfinite(bare["final"]["score"])
            runs.append((cfg, {"id": cfg.id, "config": asdict(cfg), "final": bare["final"],
                               "finite": finite, "seed_scores": [bare["final"]["score"]]}))
    top = sorted((ce for ce in runs if ce[1]["finite"]),
                 key=lambda ce: -ce[1]["final"]["score"])[:top_n]
    for cfg, e in top:
        for seed in REF_SEEDS[1:]:
            b = run_bare(Config(cfg.task, cfg.optimizer, cfg.schedule, cfg.lr, seed),
                         anchors=False)
            e["seed_scores"].append(b["final"]["score"])
        e["mean_score"] = statistics.fmean(e["seed_scores"]) if all(
            math.isfinite(v) for v in e["seed_scores"]) else math.nan
    best_cfg, best = max(((c, e) for c, e in top if math.isfinite(e["mean_score"])),
                         key=lambda ce: ce[1]["mean_score"])
    ref = best["mean_score"]
    for cfg, e in runs:
        e["healthy"] = e["finite"] and healthy(e["final"]["score"], ref)
        if with_lrwatch and e["finite"]:
            lw = run_lrwatch(cfg)
            e["lrwatch"] = {"final": lw["final"], "rollbacks": lw["rollbacks"],
                            "stopped": lw["stopped"], "actions": lw["actions"],
                            "healthy": healthy(lw["final"]["score"], ref)}
    progress(f"  reference {task}: {best_cfg.id} -> mean {problem.metric} {ref:.4f} over seeds "
             f"{list(REF_SEEDS)} ({sum(e['finite'] for _, e in runs)}/{len(runs)} sweep runs "
             f"finite)")
    return {"task": task, "metric": problem.metric, "model": problem.model_desc,
            "steps": problem.steps, "reference": ref, "reference_config": best["id"],
            "reference_cfg": asdict(best_cfg), "reference_seed_scores": best["seed_scores"],
            "runs": [e for _, e in runs]}


# --------------------------------------------------------------------------------------------
# overhead: interleaved A/B on a healthy configuration
# --------------------------------------------------------------------------------------------

#: The timed variants: name -> Watcher keyword arguments (None: no Watcher).
OVERHEAD_VARIANTS: dict[str, dict[str, Any] | None] = {
    "bare": None,
    "lrwatch": {},                                   # Watcher(model, opt, sched): all defaults
    f"lrwatch flush_every={FLUSH_EVERY}": {"flush_every": FLUSH_EVERY},   # as in the sweep
}


class _Timed:
    def __init__(self, cfg: Config, steps: int, watcher: dict[str, Any] | None) -> None:
        self.problem = get_problem(cfg.task)
        self.model = self.problem.build(cfg.seed)
        self.opt = dr._optimizer(cfg.optimizer, self.model, cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, dr._schedule_fn(cfg.schedule, steps))
        self.stream = self.problem.stream(cfg.seed)
        self.watch = Watcher(self.model, self.opt, self.sched, **watcher) \
            if watcher is not None else None

    def steps(self, n: int) -> None:
        model, opt, sched, watch, problem = self.model, self.opt, self.sched, self.watch, \
            self.problem
        for _ in range(n):
            x, y = next(self.stream)
            loss = problem.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if watch is not None:
                watch.log(loss=loss)


def _ratio_stats(var: Sequence[float], base: Sequence[float], rng: random.Random,
                 n_boot: int = 2000) -> dict[str, float]:
    """Ratio of medians and its paired bootstrap 95% interval (resampling rounds)."""
    ratio = statistics.median(var) / statistics.median(base)
    k = len(var)
    boots = sorted(statistics.median(var[i] for i in idx) / statistics.median(base[i] for i in idx)
                   for idx in ([rng.randrange(k) for _ in range(k)] for _ in range(n_boot)))
    return {"ratio": ratio, "ci_low": boots[int(0.025 * n_boot)],
            "ci_high": boots[min(n_boot - 1, int(0.975 * n_boot))]}


def overhead_ab(cfg: Config, rounds: int, warmup: int = 1, block: int = OVERHEAD_BLOCK,
                seed: int = 0, progress: Callable[[str], None] = lambda s: None
                ) -> dict[str, Any]:
    """Interleaved A/B of the healthy ``cfg``: bare, and with the Watcher (``OVERHEAD_VARIANTS``).

    Each variant trains its own copy (same initial weights, same batches in the same order);
    per round every variant runs one block of ``block`` steps, in a seeded shuffled order.
    """
    total = (rounds + warmup) * block
    runners = {k: _Timed(cfg, total, w) for k, w in OVERHEAD_VARIANTS.items()}
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        order = list(runners)
        rng.shuffle(order)
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[k].steps(block)
            dt, dc = (time.perf_counter() - t0) / block, (time.process_time() - c0) / block
            if r >= warmup:
                wall[k].append(dt)
                cpu[k].append(dc)
    problem = get_problem(cfg.task)
    res: dict[str, Any] = {
        "config": cfg.id, "task": cfg.task, "model": problem.model_desc,
        "realistic": problem.realistic,
        "params": sum(p.numel() for p in runners["bare"].model.parameters()),
        "rounds": rounds, "block": block, "steps_each": total,
        "bare_cpu_ms": statistics.median(cpu["bare"]) * 1e3,
        "bare_wall_ms": statistics.median(wall["bare"]) * 1e3, "variants": {}}
    srng = random.Random(seed + 1)
    for k, runner in runners.items():
        w = runner.watch
        if w is None:
            continue
        w.close()
        store = w.store
        seconds = sum(wall[k]) * block
        v: dict[str, Any] = {
            "rollbacks": w.policy.rollbacks, "snapshots": store.taken if store else 0,
            "snapshot_seconds": store.seconds if store else 0.0,
            "internal_errors": w.registry.get_sample_value("lrwatch_internal_errors_total")}
        v["snapshot_share"] = v["snapshot_seconds"] / seconds if seconds else 0.0
        for clock, data in (("cpu", cpu), ("wall", wall)):
            v[clock] = {"ms": statistics.median(data[k]) * 1e3,
                        "block_ms": [t * 1e3 for t in data[k]],
                        **_ratio_stats(data[k], data["bare"], srng)}
        v["target"] = TARGET_OVERHEAD if problem.realistic else None
        v["met"] = v["cpu"]["ratio"] <= TARGET_OVERHEAD if problem.realistic else None
        res["variants"][k] = v
    res["bare_block_ms"] = {"cpu": [t * 1e3 for t in cpu["bare"]],
                            "wall": [t * 1e3 for t in wall["bare"]]}
    progress(f"  overhead {cfg.id}: " + ", ".join(
        f"{k} x{v['cpu']['ratio']:.3f} cpu / x{v['wall']['ratio']:.3f} wall "
        f"({v['snapshots']} snapshots)" for k, v in res["variants"].items()))
    return res


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def _fmt_score(metric: str, score: float) -> str:
    if not math.isfinite(score):
        return "non-finite"
    return f"{score:.3f}" if metric == "accuracy" else f"R² {score:.3f}"


def _outcome(metric: str, ev: dict[str, Any], ref: float, prefix: str = "") -> str:
    mark = "✓" if healthy(ev["score"], ref) else "✗"
    return f"{mark} {prefix}{_fmt_score(metric, ev['score'])}"


def evaluate_config(cfg: Config, ref: float, *, extra: dict[str, Any] | None,
                    bare: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bare run (+ anchors), divergence check, and the lrwatch runs of one configuration."""
    bare = bare if bare is not None else run_bare(cfg)
    is_div, why = diverged(bare, ref)
    out: dict[str, Any] = {"id": cfg.id, "config": asdict(cfg), "diverged": is_div,
                           "why": why, "bare": bare, "reference": ref}
    if not is_div:
        return out
    out["lrwatch"] = run_lrwatch(cfg)
    if extra:
        out["lrwatch_extra"] = run_lrwatch(cfg, recovery=dict(extra))
    return out


def _healthy_flags(entry: dict[str, Any]) -> dict[str, bool]:
    ref = entry["reference"]
    b = entry["bare"]
    flags = {"bare": healthy(b["final"]["score"], ref),
             "nan_stop": healthy(b["anchors"]["nan_stop"]["score"], ref),
             "spike_stop": healthy(b["anchors"]["spike_stop"]["score"], ref),
             "lrwatch": healthy(entry["lrwatch"]["final"]["score"], ref)}
    if "lrwatch_extra" in entry:
        flags["lrwatch_extra"] = healthy(entry["lrwatch_extra"]["final"]["score"], ref)
    return flags


def _lrwatch_cell(metric: str, lw: dict[str, Any], ref: float) -> str:
    cell = _outcome(metric, lw["final"], ref)
    if lw["stopped"]:
        reason = lw.get("stop_reason") or ""
        cell += " (stopped: budget)" if "budget" in reason else " (stopped)"
    elif lw["capped"]:
        cell += " (step cap)"
    return cell


def _ref_table(report: dict[str, Any]) -> str:
    """The healthy references and what lrwatch did on the sweep runs."""
    refs = report["references"]
    lines = ["| task | model | metric | reference config (best mean of the LR sweep) | "
             "reference (seeds) | seed-0 sweep runs healthy | lrwatch on the finite sweep runs |",
             "|---|---|---|---|---|---|---|"]
    for t, r in refs.items():
        fin = [e for e in r["runs"] if e["finite"]]
        seeds = ", ".join(f"{v:.3f}" for v in r["reference_seed_scores"])
        if any("lrwatch" in e for e in fin):
            rb = [e for e in fin if e["lrwatch"]["rollbacks"] > 0]
            hurt = sum(e["healthy"] and not e["lrwatch"]["healthy"] for e in fin)
            helped = sum(not e["healthy"] and e["lrwatch"]["healthy"] for e in fin)
            rules = sorted({a["rule"] for e in rb for a in e["lrwatch"]["actions"]
                            if a["type"] == "rollback"})
            lw = (f"{len(rb)}/{len(fin)} rolled back" + (f" ({', '.join(rules)})" if rules
                                                         else "")
                  + f"; healthy → not: {hurt}, not → healthy: {helped}")
        else:
            lw = "–"
        lines.append(f"| {t} | {r['model']} | {r['metric']} | {r['reference_config']} | "
                     f"{r['reference']:.4f} ({seeds}) | "
                     f"{sum(e['healthy'] for e in r['runs'])}/{len(r['runs'])} | {lw} |")
    return "\n".join(lines)


def _cfg_table(report: dict[str, Any]) -> str:
    """One row per configuration whose bare run diverged."""
    refs = report["references"]
    extra_name = report["config"]["extra_label"]
    head = ["#", "task", "model", "optimizer", "schedule", "peak LR", "seed", "bare", "stop on NaN",
            "stop on spike", "lrwatch (defaults)", "rollbacks (rules)", "vs reference"]
    if extra_name:
        head.append(f"lrwatch {extra_name} (not default)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_row = 0
    for e in report["configs"]:
        if not e["diverged"]:
            continue
        n_row += 1
        c, b, lw = e["config"], e["bare"], e["lrwatch"]
        metric = refs[c["task"]]["metric"]
        ref = e["reference"]
        bare_cell = _outcome(metric, b["final"], ref)
        if b["first_nonfinite"] is not None:
            bare_cell = f"✗ NaN@{b['first_nonfinite']}"
        cells = []
        for name in ("nan_stop", "spike_stop"):
            a = b["anchors"][name]
            at = f"@{a['stop_step']} " if a["stop_step"] is not None else "no stop, "
            cells.append(_outcome(metric, a, ref, at))
        rules = sorted({a["rule"] for a in lw["actions"] if a["type"] == "rollback"})
        delta = lw["final"]["score"] - ref
        vs = f"{delta * 100:+.1f} pts" if math.isfinite(delta) else "–"
        row = [str(n_row), c["task"], get_problem(c["task"]).model_desc, c["optimizer"],
               Config(**c).schedule_desc, f"{c['lr']:g}", str(c["seed"]), bare_cell, *cells,
               _lrwatch_cell(metric, lw, ref),
               f"{lw['rollbacks']}" + (f" ({', '.join(rules)})" if rules else ""), vs]
        if extra_name:
            lx = e["lrwatch_extra"]
            row.append(_lrwatch_cell(metric, lx, ref) + f", {lx['rollbacks']} rb")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _summary_table(report: dict[str, Any]) -> str:
    """Who finishes healthy, by behaviour (and by seed set), and why lrwatch failed."""
    extra_name = report["config"]["extra_label"]
    s = report["summary"]
    n = s["diverged"]
    lines = ["| behaviour | finish healthy | share | target |", "|---|---|---|---|"]
    names = [("bare", "bare run"), ("nan_stop", "stop on NaN (Keras TerminateOnNaN)"),
             ("spike_stop", "stop on spike (Lightning SpikeDetection)"),
             ("lrwatch", "**lrwatch, defaults**")]
    if extra_name:
        names.append(("lrwatch_extra", f"lrwatch {extra_name} (not default)"))
    for k, label in names:
        h = s["healthy"][k]
        tgt = (f"≥ {TARGET_HEALTHY:.0%}: **{'met' if s['target_met'] else 'not met'}**"
               if k == "lrwatch" else "")
        share = f"{h / n:.0%}" if n else "–"
        if k == "lrwatch" and n:
            lo, hi = s["lrwatch_ci95"]
            share += f" (95% CI {lo:.0%}-{hi:.0%})"
        lines.append(f"| {label} | {h}/{n} | {share} | {tgt} |")
    if len(s["by_seed_shift"]) > 1:
        lines += ["", "| seeds | diverged | lrwatch healthy | share |", "|---|---|---|---|"]
        for k, v in s["by_seed_shift"].items():
            lines.append(f"| {k}-{int(k) + 2} | {v['diverged']} | {v['lrwatch']} | "
                         f"{v['lrwatch'] / v['diverged']:.0%} |")
    f = s["lrwatch_failures"]
    return "\n".join(lines) + (
        f"\n\nlrwatch failures: {f['no_rollback']} never rolled back, {f['budget_spent']} "
        f"stopped with the rollback budget spent, {f['step_cap']} hit the step cap, "
        f"{f['finished_below_reference']} finished the schedule below the reference. "
        f"Not diverged (excluded): {len(s['not_diverged'])} of {s['candidates']} candidates.")


def _overhead_table(report: dict[str, Any]) -> str:
    """The interleaved A/B overhead on healthy runs."""
    lines = ["| healthy config | model | params | bare ms/step (cpu) | variant | ms/step | "
             "overhead, cpu (95% CI) | overhead, wall | snapshots (share of time) | "
             "target ≤ 3% |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in report.get("overhead") or []:
        for k, v in o["variants"].items():
            c, w = v["cpu"], v["wall"]
            if not v["target"]:
                tgt = "n/a (tiny model)"
            elif not v["met"]:
                tgt = "**not met**"
            else:
                tgt = "met" if c["ci_high"] <= TARGET_OVERHEAD else "met (point estimate; CI " \
                    "reaches above 3%)"
            lines.append(
                f"| {o['config']} | {o['model']} | {o['params']:,} | {o['bare_cpu_ms']:.2f} | "
                f"{k} | {c['ms']:.2f} | {100 * (c['ratio'] - 1):+.1f}% "
                f"[{100 * (c['ci_low'] - 1):+.1f}, {100 * (c['ci_high'] - 1):+.1f}] | "
                f"{100 * (w['ratio'] - 1):+.1f}% | {v['snapshots']} "
                f"({100 * v['snapshot_share']:.1f}%) | {tgt} |")
    return "\n".join(lines)


def markdown_tables(report: dict[str, Any]) -> str:
    s = report["summary"]
    n = s["diverged"]
    return "\n\n".join([
        "### Healthy references\n\n" + _ref_table(report),
        f"### Configurations whose bare run diverged ({n} of {s['candidates']} candidates)\n\n"
        f"✓ = final held-out score finite and within {TOLERANCE * 100:g} points of the task's "
        "reference; @k = the anchor stopped the run at step k.\n\n" + _cfg_table(report),
        "### Summary\n\n" + _summary_table(report),
        "### Overhead on healthy runs (interleaved A/B, snapshots included)\n\n"
        + _overhead_table(report)])


def run(tasks: Sequence[str], *, overhead_tasks: Sequence[str], rounds: int,
        extra: dict[str, Any] | None = EXTRA_RECOVERY, sweep_lrwatch: bool = True,
        only: Sequence[str] | None = None, limit: int | None = None,
        sweep: dict[str, Any] | None = None, seed_shifts: Sequence[int] = (0,),
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole benchmark: references, candidates, lrwatch runs, overhead; returns the report.

    ``only`` keeps the candidates whose id contains one of the substrings; ``limit`` keeps the
    first ``limit`` candidates of each task and ``sweep`` narrows the reference sweep
    (``optimizers``, ``mults``, ``top_n`` of :func:`reference_sweep`), both for tests.
    """
    t0 = time.perf_counter()
    progress(f"reference sweeps ({len(tasks)} tasks) ...")
    sweep = dict(sweep or {})
    references = {t: reference_sweep(t, with_lrwatch=sweep_lrwatch, progress=progress, **sweep)
                  for t in tasks}
    cands: list[tuple[int, Config]] = []
    for k in seed_shifts:
        for t in tasks:
            cs = candidates(t, Config(**references[t]["reference_cfg"]), k)
            if only:
                cs = [c for c in cs if any(o in c.id for o in only)]
            cands += [(k, c) for c in (cs[:limit] if limit is not None else cs)]
    progress(f"{len(cands)} candidate configurations ...")
    configs = []
    for i, (shift, cfg) in enumerate(cands, 1):
        e = evaluate_config(cfg, references[cfg.task]["reference"], extra=extra)
        e["seed_shift"] = shift
        configs.append(e)
        if e["diverged"]:
            lw = e["lrwatch"]
            progress(f"  [{i}/{len(cands)}] {cfg.id}: diverged ({e['why'][:50]}); lrwatch "
                     f"{lw['final']['score']:.4f} after {lw['rollbacks']} rollbacks"
                     f"{' (stopped)' if lw['stopped'] else ''}")
        else:
            progress(f"  [{i}/{len(cands)}] {cfg.id}: not diverged ({e['why'][:50]})")
    div = [e for e in configs if e["diverged"]]
    keys = ["bare", "nan_stop", "spike_stop", "lrwatch"] + (["lrwatch_extra"] if extra else [])
    flags = [_healthy_flags(e) for e in div]
    counts = {k: sum(f[k] for f in flags) for k in keys}
    n = len(div)
    fails = [e["lrwatch"] for e, f in zip(div, flags) if not f["lrwatch"]]
    by_shift: dict[str, dict[str, int]] = {}
    for e, f in zip(div, flags):
        k = str(e["seed_shift"])
        by_shift.setdefault(k, {"diverged": 0, "lrwatch": 0})
        by_shift[k]["diverged"] += 1
        by_shift[k]["lrwatch"] += int(f["lrwatch"])
    summary = {
        "candidates": len(configs), "diverged": n,
        "not_diverged": [{"id": e["id"], "why": e["why"]} for e in configs
                         if not e["diverged"]],
        "healthy": counts, "share": {k: (v / n if n else math.nan) for k, v in counts.items()},
        "lrwatch_ci95": _wilson(counts["lrwatch"], n),
        "by_seed_shift": by_shift,
        "target": TARGET_HEALTHY,
        "target_met": bool(n) and counts["lrwatch"] / n >= TARGET_HEALTHY,
        "lrwatch_failures": {
            "no_rollback": sum(lw["rollbacks"] == 0 for lw in fails),
            "budget_spent": sum("budget" in (lw.get("stop_reason") or "") for lw in fails),
            "step_cap": sum(bool(lw["capped"]) for lw in fails),
            "finished_below_reference": sum(lw["rollbacks"] > 0 and not lw["stopped"]
                                            and not lw["capped"] for lw in fails)},
        "lrwatch_rollbacks_median": statistics.median(
            [e["lrwatch"]["rollbacks"] for e in div]) if div else math.nan,
        "lrwatch_stopped_last_good_healthy": sum(
            healthy(e["lrwatch"]["last_good"]["score"], e["reference"]) for e in div
            if "last_good" in e["lrwatch"]),
    }
    progress("overhead A/B on healthy runs ...")
    overhead = []
    for t in overhead_tasks:
        ref_cfg = (Config(**references[t]["reference_cfg"]) if t in references else
                   Config(t, "adam", "warmup", float(f"{get_problem(t).base_lr['adam']:.6g}")))
        overhead.append(overhead_ab(ref_cfg, rounds, progress=progress))
    realistic = [v for o in overhead for k, v in o["variants"].items()
                 if v["target"] and k == "lrwatch"]
    summary["overhead_target_met"] = all(v["met"] for v in realistic) if realistic else None
    report: dict[str, Any] = {
        "benchmark": "recovery",
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "config": {"tasks": list(tasks), "seed_shifts": list(seed_shifts), "tolerance": TOLERANCE,
                   "flush_every": FLUSH_EVERY,
                   "eval_every": EVAL_EVERY, "step_cap": STEP_CAP,
                   "recovery": asdict(RecoveryConfig()), "extra_recovery": extra,
                   "extra_label": (", ".join(f"{k}={v}" for k, v in extra.items())
                                   if extra else None),
                   "reference_sweep": {"optimizers": REF_OPTIMIZERS, "mults": REF_MULTS,
                                       "schedule": "warmup", "seeds": REF_SEEDS,
                                       "top_n": REF_TOP, **sweep},
                   "overhead_rounds": rounds, "overhead_block": OVERHEAD_BLOCK,
                   "overhead_variants": OVERHEAD_VARIANTS},
        "references": references, "configs": configs, "summary": summary,
        "overhead": overhead}
    try:
        report["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    report["seconds"] = time.perf_counter() - t0
    report["table"] = markdown_tables(report)
    return report


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share k/n.

    >>> [round(x, 3) for x in _wilson(91, 112)]
    [0.73, 0.874]
    """
    if n == 0:
        return math.nan, math.nan
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def pool(paths: Sequence[str]) -> str:
    """Pool the diverging runs of several ``--json`` results (e.g. one per ``--seed-shifts``)."""
    lines = ["| result file | seed shift | diverged | lrwatch healthy | share | bare | stop on NaN "
             "| stop on spike |", "|---|---|---|---|---|---|---|---|"]
    tot: dict[str, int] = {}
    n_all = 0
    for path in paths:
        rep = json.loads(Path(path).read_text())
        div = [e for e in rep["configs"] if e["diverged"]]
        for e in div:   # non-finite scores are stored as strings in the JSON
            for arm in ("bare", "lrwatch"):
                if arm == "bare":
                    for k in ("nan_stop", "spike_stop"):
                        e[arm]["anchors"][k]["score"] = float(e[arm]["anchors"][k]["score"])
                e[arm]["final"]["score"] = float(e[arm]["final"]["score"])
            e.pop("lrwatch_extra", None)
        flags = [_healthy_flags(e) for e in div]
        c = {k: sum(f[k] for f in flags) for k in ("lrwatch", "bare", "nan_stop", "spike_stop")}
        for k, v in c.items():
            tot[k] = tot.get(k, 0) + v
        n_all += len(div)
        n = len(div)
        shifts = rep["config"].get("seed_shifts", [rep["config"].get("seed_shift", 0)])
        lines.append(f"| {Path(path).name} | {','.join(map(str, shifts))} | {n} | "
                     f"{c['lrwatch']} | {c['lrwatch'] / n:.0%} | {c['bare']} | {c['nan_stop']} "
                     f"| {c['spike_stop']} |")
    lo, hi = _wilson(tot.get("lrwatch", 0), n_all)
    share = tot.get("lrwatch", 0) / n_all if n_all else math.nan
    lines.append(f"| **pooled** | | {n_all} | **{tot.get('lrwatch', 0)}** | **{share:.0%}** "
                 f"(95% CI {lo:.0%}-{hi:.0%}) | {tot.get('bare', 0)} | {tot.get('nan_stop', 0)} "
                 f"| {tot.get('spike_stop', 0)} |")
    lines.append("")
    lines.append(f"pooled: {tot.get('lrwatch', 0)}/{n_all} diverging runs finish healthy with "
                 f"lrwatch's defaults ({share:.1%}, 95% CI {lo:.1%}-{hi:.1%}; target "
                 f"{TARGET_HEALTHY:.0%})")
    return "\n".join(lines)


def _clean(o: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"), as the trace format writes them."""
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def main(argv: Sequence[str] | None = None) -> int:
    if "--families" in (sys.argv[1:] if argv is None else list(argv)):
        return fam_main(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tasks {', '.join(QUICK_TASKS)} only, fewer overhead rounds "
                        "(under 2 minutes)")
    p.add_argument("--smoke", action="store_true",
                   help="one task, a two-run sweep, one candidate, one overhead round, no "
                        "lrwatch on the sweep (for tests; numbers meaningless)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: keep the candidates whose id contains one")
    p.add_argument("--rounds", type=int, default=None, help="overhead A/B rounds per model")
    p.add_argument("--no-extra", action="store_true",
                   help=f"skip the non-default recovery column ({EXTRA_RECOVERY})")
    p.add_argument("--seed-shifts", default=None, metavar="K,K,...",
                   help="seed sets of the candidates: each K adds K to every candidate's seed "
                        "(0-2); the same configurations on other weights and batch orders, "
                        "pooled (default 0,3,6; --quick 0; the references always use 0-2)")
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead A/B")
    p.add_argument("--overhead-only", action="store_true",
                   help="only the overhead A/B on the realistic model (digits_wide); use a "
                        "quiet machine and more --rounds for a tighter interval")
    p.add_argument("--json", metavar="OUT", help="also write the full results as JSON")
    p.add_argument("--pool", nargs="+", metavar="JSON",
                   help="only pool the diverging runs of earlier --json results (run with "
                        "--seed-shifts 0, 3 and 6 separately) into one table and share")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)

    torch.set_num_threads(1)              # deterministic bare runs; a small shared machine
    torch.set_flush_denormal(True)
    logging.getLogger("lrwatch").setLevel(logging.CRITICAL)   # rollbacks are in the report

    def progress(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    if a.pool:
        print(pool(a.pool))
        return 0
    if a.overhead_only:
        cfg = Config("digits_wide", "adam", "warmup",
                     float(f"{get_problem('digits_wide').base_lr['adam']:.6g}"))
        res = overhead_ab(cfg, a.rounds or 24, progress=progress)
        for k, v in res["variants"].items():
            c = v["cpu"]
            print(f"{cfg.id} {res['params']:,} params, bare {res['bare_cpu_ms']:.2f} ms/step: "
                  f"{k}: {c['ratio'] - 1:+.1%} cpu "
                  f"[{c['ci_low'] - 1:+.1%}, {c['ci_high'] - 1:+.1%}], "
                  f"{v['wall']['ratio'] - 1:+.1%} wall; {v['snapshots']} snapshots "
                  f"({v['snapshot_share']:.1%} of the time)")
        if a.json:
            Path(a.json).write_text(json.dumps(_clean(res), indent=1, default=str))
        return 0
    limit, sweep = None, None
    if a.smoke:
        sweep = {"optimizers": ("adam",), "mults": (1.0, 3.0), "top_n": 1}
        tasks, ov_tasks, rounds, limit = ["digits_mlp"], ["digits_mlp"], a.rounds or 1, 1
    elif a.quick:
        tasks, ov_tasks, rounds = list(QUICK_TASKS), ["digits_wide", "digits_mlp"], a.rounds or 8
    else:
        tasks = list(TASKS)
        ov_tasks = ["digits_wide", *TASKS]
        rounds = a.rounds or 24
    if a.tasks:
        tasks = a.tasks.split(",")
        for t in tasks:
            if t not in TASKS:
                p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        ov_tasks = [t for t in ov_tasks if t == "digits_wide" or t in tasks]
    if a.no_overhead:
        ov_tasks = []
    shifts = ([int(k) for k in a.seed_shifts.split(",")] if a.seed_shifts else
              [0] if (a.quick or a.smoke) else [0, 3, 6])
    report = run(tasks, overhead_tasks=ov_tasks, rounds=rounds, seed_shifts=shifts,
                 extra=None if a.no_extra else EXTRA_RECOVERY, sweep_lrwatch=not a.smoke,
                 only=a.only.split(",") if a.only else None, limit=limit, sweep=sweep,
                 progress=progress)
    print(report["table"])
    s = report["summary"]
    n = s["diverged"]
    print()
    if n:
        print(f"lrwatch (defaults): {s['healthy']['lrwatch']}/{n} diverging runs finish healthy "
              f"({s['share']['lrwatch']:.0%}; target {TARGET_HEALTHY:.0%}: "
              f"{'met' if s['target_met'] else 'NOT met'}); bare {s['healthy']['bare']}/{n}, "
              f"stop-on-NaN {s['healthy']['nan_stop']}/{n}, stop-on-spike "
              f"{s['healthy']['spike_stop']}/{n}")
    if s["overhead_target_met"] is not None:
        print(f"overhead target (≤3% with Watcher defaults on the realistic model): "
              f"{'met' if s['overhead_target_met'] else 'NOT met'}")
    print(f"{report['seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(_clean(report), indent=1, default=str))
    return 0


# ============================================================================================
# Issue 13: the family suite (benchmarks/families.py), fixed step budgets, measured rates
# ============================================================================================

FAM_TASKS = ("synth_clf_mlp", "digits_cnn", "chars_gru", "chars_tfm_pre", "friedman_mlp",
             "digits_ae")
FAM_OPTS = ("momentum", "adam", "rmsprop")
FAM_MULTS = (3.0, 10.0, 30.0)
FAM_FAULTS = ("nan_batch", "poisoned_batch")
FAM_SEEDS = (0, 1, 2)         # healthy median: the tuned rate on these seeds
FAM_EVAL_EVERY = 20
FAM_FAULT_AT = 150
FAM_CACHE = Path(__file__).resolve().parent / ".cache" / "recovery_families"
FAM_VERSION = 11          # 11: watched runs record their first rollback
#: The learning-rate schedule of every run of the suite (``--schedule``): ``constant`` (the
#: suite's protocol), or one of the detection suite's (``warmup``: linear over 10% then cosine)
#: given to the Watcher as its ``scheduler``; the healthy median is then the tuned rate's on
#: the same schedule.
FAM_SCHEDULE = "constant"
#: The step budget as a multiple of the task's own 300 steps (``--budget``): every run of the
#: suite, the healthy median's included, trains ``FAM_BUDGET x task.steps`` optimizer steps,
#: and a one-off fault hits at the same share of the run (half of it). 1 is the protocol; a
#: longer budget measures how much of what the defaults miss is the budget's shortness (a
#: restart after 100 of 300 steps has a third of the run to catch up, of 900 two thirds).
FAM_BUDGET = 1


def family_args(tasks_from: str | None, tasks: str | None, opts: str | None
                ) -> tuple[list[str], list[str]]:
    """The families a family-protocol benchmark runs, from its ``--tasks-from FILE``,
    ``--tasks`` and ``--opts`` (comma-separated): the suite's by default, a task file's
    (whose runs then cache under their own directory, ``FAM_CACHE``) with ``--tasks-from``.
    Raises ``ValueError`` naming what to fix: a task file that does not load, an unknown
    task."""
    from benchmarks import external
    from benchmarks import families as fam

    names, file_opts = list(FAM_TASKS), list(FAM_OPTS)
    if tasks_from:
        global FAM_CACHE
        try:
            loaded, opts_of_file = external.load(tasks_from)
        except external.TaskFileError as e:
            raise ValueError(str(e)) from e
        names, file_opts = list(loaded), list(opts_of_file)
        FAM_CACHE = external.cache_dir("recovery", tasks_from)
    names = tasks.split(",") if tasks else names
    unknown = [x for x in names if x not in fam.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(fam.TASKS)}")
    return names, (opts.split(",") if opts else file_opts)


def fam_steps(task: Any) -> int:
    """The run's budget of optimizer steps (``FAM_BUDGET`` x the task's own)."""
    return int(task.steps * FAM_BUDGET)


def lrwatch_code_hash() -> str:
    """A hash of lrwatch's source: the watched arms' cache key holds it, so a changed detector
    or policy reruns them even when the rule text is the same (the bare runs stay cached)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root = Path(lrwatch.__file__).resolve().parent
        h = hashlib.sha1()
        for f in sorted(root.rglob("*.py")) + sorted(root.rglob("*.yml")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()[:12]
    return _CODE_HASH


_CODE_HASH: str | None = None
FAM_ARMS = {"measured": {"probe": "auto"}, "fixed": {"probe": "off"}}   # the ablation
#: Arms compared with the defaults in every table, name -> (recovery arm, rules): the defaults
#: without the stall cut (the training pack's ``loss_plateau`` halves the
#: rate of a run without a scheduler; docs/recovery.md, "Cutting the rate when the loss
#: stalls").
FAM_RULE_ARMS: dict[str, tuple[str, tuple[str, ...] | None]] = {"no_cut": ("no_cut", None)}
#: Column titles of those arms.
FAM_RULE_TITLES = {"no_cut": "no stall cut (otherwise the defaults)",
                   "plateau_cut": "plateau_cut pack (not default)"}
#: With a schedule (``--schedule``) the defaults leave the rate alone on a stall; this arm
#: cuts it there too (why that is not the default: docs/recovery.md).
FAM_SCHEDULED_ARMS = {"plateau_cut": ("fixed", ("training", "plateau_cut"))}
#: The rules every watched arm runs with (``--rules FILE`` replaces the default pack, in the
#: rule arms too: a candidate pack is measured with the same protocol).
FAM_RULES: str = "training"
#: Recovery settings every watched arm runs with on top of its own (``--recovery JSON``: the
#: ablation of one default, e.g. ``{"start_check_gate": 0}``); part of the cache key.
FAM_RECOVERY: dict[str, Any] = {}
#: One-off faults, against the default: the guard off (the default before 5 December, when
#: ``guard="auto"`` did nothing for a non-fused optimizer on the CPU) and the replay after a
#: sudden failure (opt-in; docs/recovery.md, "The guard and the replay").
FAM_FAULT_ARMS = {"guard_off": {"probe": "off", "guard": "off"},
                  "replay": {"probe": "off", "replay": True}}
#: Arms outside the suite's table (``benchmarks/recovery_preflight.py``): the pre-flight check.
FAM_EXTRA_ARMS = {f"lr_check{n}": {"probe": "off", "lr_check": "auto", "lr_check_steps": n}
                  for n in (11, 15, 30)}
FAM_EXTRA_ARMS.update(FAM_FAULT_ARMS)
FAM_EXTRA_ARMS["no_cut"] = {"probe": "off", "cut_unscheduled": False}
#: Bumped when the pre-flight check itself changes (2: scored on a fixed batch), so that its
#: arms rerun while the bare runs and the suite's arms stay cached.
FAM_CHECK_VERSION = 2


def _fam_stream(task: Any, data: Any, seed: int) -> Any:
    g = torch.Generator().manual_seed(3000 + seed)       # train_run's batch order
    n = data.n_train
    while True:
        perm = torch.randperm(n, generator=g)
        for c in range(0, n - task.batch + 1, task.batch):
            yield data.batch(perm[c:c + task.batch])


def _fam_score(task: Any, data: Any, model: nn.Module) -> dict[str, float]:
    from benchmarks import families as fam

    loss, acc = fam.evaluate(task, model, data)
    return {"loss": loss, "acc": acc if acc is not None else math.nan}


def _rules_text(rules: str | Sequence[str]) -> str:
    """The text of the rules an arm runs with: a pack name, a rule file, or a list of these."""
    from lrwatch.rules.schema import PACKS, pack_text

    parts = [rules] if isinstance(rules, str) else list(rules)
    return "\n".join(pack_text(r) if r in PACKS else Path(r).read_text() for r in parts)


def _arm_rules(rules: str | Sequence[str] | None) -> str | list[str]:
    """The rules of a watched arm: ``FAM_RULES`` by default, and in place of the default
    pack in a list of packs (``--rules FILE`` measures a candidate pack in every arm)."""
    if rules is None:
        return FAM_RULES
    if isinstance(rules, str):
        return rules
    return [FAM_RULES if r == "training" else r for r in rules]


def fam_cache_path(task_name: str, opt: str, mult: float, seed: int, fault: str | None,
                   arm: str | None, rules: str | Sequence[str]) -> Path:
    """Where one run of the suite is cached: a hash of everything that decides its outcome
    (for a watched arm also the rule text and lrwatch's source)."""
    # bare runs do not depend on lrwatch's version: only the arms are rerun when it changes
    # (bare version 3: a clean bare run is labelled, `fam_bare_label`, and keeps its evaluations)
    from benchmarks import families as fam

    key = f"{FAM_VERSION if arm else 3}/{task_name}/{opt}/{mult}/{seed}/{fault}/{arm}"
    data = getattr(fam.TASKS.get(task_name), "data", "")
    if data in fam.DATA_VERSION:   # the runs of a data set whose preparation changed rerun
        key += f"/data={fam.DATA_VERSION[data]}"
    if FAM_SCHEDULE != "constant":
        key += f"/schedule={FAM_SCHEDULE}"
    if FAM_BUDGET != 1:
        key += f"/budget={FAM_BUDGET}"
    if arm in FAM_EXTRA_ARMS:
        key += "/" + json.dumps(FAM_EXTRA_ARMS[arm], sort_keys=True)
        key += f"/{FAM_CHECK_VERSION}" if arm not in (*FAM_FAULT_ARMS, "no_cut") else ""
    if arm is not None and FAM_RECOVERY:
        key += "/recovery=" + json.dumps(FAM_RECOVERY, sort_keys=True)
    if arm is not None:   # a changed pack (or --rules FILE), or changed lrwatch code, reruns them
        key += "/" + hashlib.sha1(_rules_text(rules).encode()).hexdigest()[:12]
        key += "/" + lrwatch_code_hash()
    return FAM_CACHE / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")


def fam_run(task_name: str, opt: str, mult: float, seed: int, *, fault: str | None = None,
            arm: str | None = None, rules: str | Sequence[str] | None = None
            ) -> dict[str, Any]:
    """One run of the budget (the task's 300 optimizer steps x ``FAM_BUDGET``, constant rate = ``mult`` x the
    tuned one). ``arm=None``: bare; else a Watcher with the arm's recovery settings and a
    ``probe_loss``. Every optimizer step counts against the budget, replays after a rollback
    and the probe's range-test steps included."""
    from benchmarks import families as fam

    rules = _arm_rules(rules)
    path = fam_cache_path(task_name, opt, mult, seed, fault, arm, rules)
    if path.exists():
        return json.loads(path.read_text())
    task = fam.TASKS[task_name]
    data = task.load(seed)
    torch.manual_seed(seed)
    model = task.build(data)
    lr = task.base_lr[opt] * mult
    optimizer = fam.make_optimizer(opt, model, lr)
    sched = (None if FAM_SCHEDULE == "constant" else torch.optim.lr_scheduler.LambdaLR(
        optimizer, dr._schedule_fn(FAM_SCHEDULE, fam_steps(task))))
    untrained = _fam_score(task, data, model)
    curve: list[Sample] | None = None
    levels: dict[str, float] = {}
    if arm is None and fault is None:     # kept to label the bare run (`fam_bare_label`)
        curve = []
        levels = _fam_start_levels(task, data, model, seed)
    w = None
    if arm is not None:
        w = lrwatch.Watcher(model, optimizer, sched, flush_every=FLUSH_EVERY,
                            rules=rules if isinstance(rules, str) else list(rules),
                            recovery={**{**FAM_ARMS, **FAM_EXTRA_ARMS}[arm], **FAM_RECOVERY},
                            probe_loss=lambda m, b: task.loss(m(b[0]), b[1]))
    done, nonfinite, first_action = _fam_loop(task, data, model, optimizer, sched, w, seed,
                                              fault, curve, levels)
    if w is not None:
        w.close()
    final = _fam_score(task, data, model)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    res = {"task": task_name, "family": task.family, "optimizer": opt, "mult": mult,
           "seed": seed, "fault": fault, "arm": arm, "final": final, "untrained": untrained,
           "finite": finite and math.isfinite(final["loss"]), "nonfinite_loss": nonfinite,
           "steps": done}
    if curve is not None:
        res["label"] = fam_bare_label(task_name, seed, curve)
        key_ = "eval_accuracy" if task.classification else "eval_loss"
        res["evals"] = [[c.step, c.values[key_]] for c in curve if key_ in c.values]
    if w is not None:
        st = w.policy.state
        res.update(rollbacks=st.rollbacks, probes=st.probes, probe_steps=st.probe_steps,
                   restarts=int(st.episode_restart), exit_status=w.exit_status,
                   lr_scale=st.lr_scale, first_action=first_action or None)
    FAM_CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def _fam_fault(fault: str | None, data: Any, xb: torch.Tensor, yb: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A poisoned batch (``Data.poison``: garbage inputs, wrong targets); any other fault
    leaves the batch as it is (a NaN batch is made at the loss)."""
    return data.poison(xb, yb) if fault == "poisoned_batch" else (xb, yb)


def _fam_loss(task: Any, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
              poisoned: bool) -> torch.Tensor:
    """The batch's loss; a poisoned batch the task's model or loss cannot take (float columns
    that hold indices, multiplied with the rest) stops with an error that names the fix."""
    if not poisoned:
        return task.loss(model(xb), yb)
    try:
        return task.loss(model(xb), yb)
    except (IndexError, RuntimeError, ValueError) as e:
        raise SystemExit(
            f"task {task.name}: its model or loss cannot take the poisoned batch (every float "
            f"input and target x 1000, Data.poison): {type(e).__name__}: {e}. If its float "
            f"inputs or targets hold indices, give its Data a poison(xb, yb) that keeps them "
            f"valid (benchmarks/external.py)") from e


def _fam_loop(task: Any, data: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
              sched: Any, w: Any, seed: int, fault: str | None, curve: list[Sample] | None,
              levels: Mapping[str, float]) -> tuple[int, bool, dict[str, Any]]:
    """Train until the budget is spent (probe steps included) or lrwatch stops the run; the
    fault hits the ``FAM_FAULT_AT``-th step of the run's own progress, once. Returns the steps
    done, whether a loss was not finite, and the first rollback (budget spent then)."""
    batches = w.batches(_fam_stream(task, data, seed)) if w else _fam_stream(task, data, seed)
    done, faulted, nonfinite, budget = 0, False, False, fam_steps(task)
    fault_at = FAM_FAULT_AT * FAM_BUDGET
    first_action: dict[str, Any] = {}       # the budget spent when lrwatch first rolled back
    for xb, yb in batches:
        probe_steps = w.policy.state.probe_steps if w else 0
        if done + probe_steps >= budget or (w is not None and w.should_stop):
            break
        hit = bool(fault) and not faulted and done + 1 == fault_at
        if hit:
            faulted = True
            xb, yb = _fam_fault(fault, data, xb, yb)
        loss = _fam_loss(task, model, xb, yb, hit and fault == "poisoned_batch")
        if fault == "nan_batch" and hit:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if sched is not None:
            sched.step()
        done += 1
        if curve is not None:
            curve.append(_fam_sample(task, data, model, done, loss, levels))
        if w is None:
            if not math.isfinite(float(loss.detach())):
                nonfinite = True
                if fault is None:
                    break           # a bare run that overflowed is over
        else:
            _fam_log(task, data, model, w, loss)
            if not first_action and w.policy.state.rollbacks:
                first_action = {"at": done, "to": w.policy.state.last_rollback_to,
                                "restart": bool(w.policy.state.episode_restart)}
    return done, nonfinite, first_action


def _fam_sample(task: Any, data: Any, model: nn.Module, done: int, loss: torch.Tensor,
                levels: Mapping[str, float]) -> Sample:
    """A bare clean run's sample of step ``done`` (its start levels on the first step and an
    evaluation every ``FAM_EVAL_EVERY`` steps), for its label."""
    values: dict[str, float] = {"loss": float(loss.detach())}
    if done == 1:
        values.update(levels)
    if done % FAM_EVAL_EVERY == 0:
        ev = _fam_score(task, data, model)
        values["eval_loss"] = ev["loss"]
        if not math.isnan(ev["acc"]):
            values["eval_accuracy"] = ev["acc"]
    return Sample(step=done, values=values)


def _fam_log(task: Any, data: Any, model: nn.Module, w: Any, loss: torch.Tensor) -> None:
    """Log the step to the Watcher, with an evaluation every ``FAM_EVAL_EVERY`` of its steps."""
    metrics: dict[str, Any] = {"loss": loss.detach()}
    if w.step % FAM_EVAL_EVERY == 0:
        ev = _fam_score(task, data, model)
        metrics["eval_loss"] = ev["loss"]
        if not math.isnan(ev["acc"]):
            metrics["eval_accuracy"] = ev["acc"]
    w.log(**metrics)


def _fam_start_levels(task: Any, data: Any, model: nn.Module, seed: int) -> dict[str, float]:
    """The untrained and constant-prediction losses the Watcher measures before the first step
    (``lrwatch.untrained``), on the first batches of the run's own stream (a fresh copy of the
    deterministic stream: the run's batches are not consumed; RNG and buffers restored)."""
    from lrwatch.untrained import (UNTRAINED_BATCHES, OutputShapes, measure_constant_loss,
                                   measure_untrained_loss)

    stream = _fam_stream(task, data, seed)
    batches = [next(stream) for _ in range(UNTRAINED_BATCHES)]
    loss_of = lambda m, xy: task.loss(m(xy[0]), xy[1])  # noqa: E731
    outputs = OutputShapes()
    out: dict[str, float] = {}
    median = measure_untrained_loss(model, batches, loss_of, outputs)
    if median is not None:
        out["untrained_loss"] = float(median)
    constant = measure_constant_loss(batches, loss_of, outputs)
    if constant is not None:
        out["constant_loss"] = float(constant)
    return out


#: How a bare run that ended outside the band failed, by the detection suite's labeller
#: (``benchmarks.family_runs.label_natural``, its documented rules, nothing tuned here):
#: ``diverged`` -- non-finite, a loss that ended far above its best, stuck above its untrained
#: level, or never learned (no better than a constant prediction, or at chance);
#: ``ambiguous`` -- finite, but its training loss ended above 0.8x its untrained level, or it
#: rose far above its running minimum and came back; ``learned`` -- it learned (healthy by those
#: rules: 0.8x its untrained loss or lower, no large excursion) and ended outside the band all
#: the same: a rate too high to train as well, not a failure any training signal shows.
FAM_OUTCOMES = ("diverged", "ambiguous", "learned")


def fam_bare_label(task_name: str, seed: int, curve: Sequence[Sample]) -> dict[str, Any]:
    """Label a bare run's curve with the detection suite's labeller (see ``FAM_OUTCOMES``)."""
    from benchmarks import family_runs as fr

    lab = fr.label_natural(curve, fr.chance_accuracy(task_name, seed))
    return {"label": lab["label"], "kind": lab.get("kind"), "reason": lab.get("reason"),
            "onset": lab.get("onset"),
            "outcome": {"diverged": "diverged", "healthy": "learned"}.get(lab["label"],
                                                                          "ambiguous")}


def fam_restart_ceiling(task: Any, tuned_bare: dict[str, Any],
                        first_action: dict[str, Any] | None,
                        ref: dict[str, float]) -> dict[str, Any] | None:
    """The best a restart could have done: a run restarted from scratch after spending ``at``
    steps of the budget has ``steps - at`` left; at the tuned rate it ends where the tuned bare
    run stood at that step (its last evaluation at or before it). ``None`` when lrwatch did not
    restart the run (no action, or a rollback to a later snapshot)."""
    if not first_action or not first_action.get("restart") or not tuned_bare.get("evals"):
        return None
    left = fam_steps(task) - int(first_action["at"])
    before = [v for st, v in tuned_bare["evals"] if st <= left]
    if not before:
        return {"at": first_action["at"], "left": left, "value": None, "ok": False}
    v = float(before[-1])
    return {"at": first_action["at"], "left": left, "value": v,
            "ok": fam_close(task, v, ref["median"], ref["untrained"], 2.0)}


def fam_value(task: Any, r: dict[str, Any]) -> float:
    """The score compared against the healthy median: accuracy (classifiers and LMs), held-out
    loss (regression, autoencoders; lower is better). Non-finite: nan."""
    if not r["finite"]:
        return math.nan
    if task.classification and math.isnan(r["final"]["acc"]):
        raise ValueError(f"task {task.name!r} is a classifier (classification is true) but "
                         "reports no accuracy; the recovery benchmark scores classifiers by "
                         "accuracy: return one from Task.accuracy, or make classification "
                         "false to be scored by the held-out loss")
    return r["final"]["acc"] if task.classification else r["final"]["loss"]


def fam_close(task: Any, value: float, ref: float, untrained: float, points: float) -> bool:
    """Within ``points`` accuracy points of ``ref``; for regression/autoencoders within
    ``points * 2.5`` % of the range from the untrained loss to ``ref`` (2 points <-> 5%)."""
    if math.isnan(value):
        return False
    if task.classification:
        return value >= ref - points / 100
    return value <= ref + (points * 0.025) * max(untrained - ref, 1e-12)


def fam_bare_diverged(task: Any, bare: dict[str, Any], ref: float, untrained: float) -> bool:
    """The bare run failed: not finite, or ended outside the 2-point band of the healthy
    median (a blow-up that left the network dead or damaged). ``untrained``: the reference's
    untrained loss (seed 0's), which sets a regression's band for the watched arms too, so a
    run selected as outside the band is outside it for an arm that does nothing. (Until 5
    December, third round, the selection used the bare run's own untrained loss: a regression
    whose seeds start at different losses could be selected and then count as healed by an arm
    that did nothing.)"""
    return not fam_close(task, fam_value(task, bare), ref,
                         untrained if not task.classification else 0.0, 2.0)


def fam_suite(tasks: Sequence[str], opts: Sequence[str], seeds: Sequence[int],
              progress: Callable[[str], None]) -> dict[str, Any]:
    """Every row of the family suite: the healthy references, the would-diverge candidates,
    the tuned runs watched and the one-off faults (each run cached, see :func:`fam_run`)."""
    from benchmarks import families as fam

    refs: dict[tuple[str, str], dict[str, float]] = {}
    for t in tasks:
        task = fam.TASKS[t]
        for o in opts:
            vals = [fam_value(task, fam_run(t, o, 1.0, s)) for s in FAM_SEEDS]
            unt = fam_run(t, o, 1.0, FAM_SEEDS[0])["untrained"]["loss"]
            refs[(t, o)] = {"median": statistics.median(vals), "untrained": unt}
            progress(f"{t} {o}: healthy median {refs[(t, o)]['median']:.4f}")
    rows, fault_rows, tuned_rows = [], [], []
    for t in tasks:
        task = fam.TASKS[t]
        for o in opts:
            ref = refs[(t, o)]
            for m in FAM_MULTS:
                for s in seeds:
                    rows.append(_fam_candidate(task, t, o, m, s, ref, progress))
            tuned_rows += [_fam_tuned(task, t, o, s, ref) for s in seeds]
            for f in FAM_FAULTS:
                for s in seeds:
                    fault_rows.append(_fam_fault_row(task, t, o, f, s, ref))
                    progress(f"{t} {o} {f} s{s}: clean {fault_rows[-1]['clean']:.4f} -> "
                             f"{fault_rows[-1]['value']:.4f} "
                             f"({'ok' if fault_rows[-1]['ok'] else 'FAIL'})")
    return {"refs": {f"{k[0]}/{k[1]}": v for k, v in refs.items()}, "rows": rows,
            "faults": fault_rows, "tuned": tuned_rows}


def _fam_candidate(task: Any, t: str, o: str, m: float, s: int, ref: Mapping[str, float],
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """A rate ``m`` x the tuned one: not diverged, or what every arm made of it."""
    bare = fam_run(t, o, m, s)
    if not fam_bare_diverged(task, bare, ref["median"], ref["untrained"]):
        return {"task": t, "opt": o, "mult": m, "seed": s, "diverged": False}
    row = {"task": t, "family": task.family, "opt": o, "mult": m, "seed": s,
           "diverged": True, "bare": fam_value(task, bare), "bare_label": bare.get("label")}
    runs = {arm: fam_run(t, o, m, s, arm=arm) for arm in (*FAM_ARMS, "guard_off")}
    runs.update({name: fam_run(t, o, m, s, arm=arm_, rules=packs)
                 for name, (arm_, packs) in FAM_RULE_ARMS.items()})
    for arm, r in runs.items():
        v = fam_value(task, r)
        row[arm] = {"value": v, "ok": fam_close(task, v, ref["median"], ref["untrained"], 2.0),
                    **{k: r.get(k) for k in ("rollbacks", "probes", "probe_steps",
                                             "exit_status", "lr_scale", "first_action")}}
    row["restart_ceiling"] = fam_restart_ceiling(
        task, fam_run(t, o, 1.0, s), runs["fixed"].get("first_action"), ref)
    progress(f"{t} {o} x{m:g} s{s}: bare {row['bare']:.4f} -> probe=auto "
             f"{row['measured']['value']:.4f} ({'ok' if row['measured']['ok'] else 'FAIL'}), "
             f"fixed {row['fixed']['value']:.4f} (ref {ref['median']:.4f})")
    return row


def _fam_tuned(task: Any, t: str, o: str, s: int, ref: Mapping[str, float]) -> dict[str, Any]:
    """The tuned run, watched: what the arms do to a healthy run."""
    bare_v = fam_value(task, fam_run(t, o, 1.0, s))
    tuned = {"task": t, "family": task.family, "opt": o, "seed": s, "bare": bare_v,
             "bare_ok": fam_close(task, bare_v, ref["median"], ref["untrained"], 2.0)}
    arms = {"fixed": fam_run(t, o, 1.0, s, arm="fixed")}
    arms.update({name: fam_run(t, o, 1.0, s, arm=arm_, rules=packs)
                 for name, (arm_, packs) in FAM_RULE_ARMS.items()})
    for arm, r in arms.items():
        v = fam_value(task, r)
        tuned[arm] = {"value": v, "lr_scale": r.get("lr_scale"),
                      "ok": fam_close(task, v, ref["median"], ref["untrained"], 2.0)}
    return tuned


def _fam_fault_row(task: Any, t: str, o: str, f: str, s: int,
                   ref: Mapping[str, float]) -> dict[str, Any]:
    """A one-off fault on the tuned run: watched, against the clean runs, bare and watched."""
    clean = fam_value(task, fam_run(t, o, 1.0, s))
    watched = fam_value(task, fam_run(t, o, 1.0, s, arm="fixed"))
    r = fam_run(t, o, 1.0, s, fault=f, arm="fixed")
    b = fam_run(t, o, 1.0, s, fault=f)
    v = fam_value(task, r)
    unt = ref["untrained"]
    return {
        "task": t, "family": task.family, "opt": o, "fault": f, "seed": s,
        "clean": clean, "value": v, "bare": fam_value(task, b),
        "ok": fam_close(task, v, clean, unt, 1.0),
        "watched": watched,
        "ok_watched": fam_close(task, v, watched, unt, 1.0),
        "bare_ok": fam_close(task, fam_value(task, b), clean, unt, 1.0),
        "rollbacks": r.get("rollbacks"), "probe_steps": r.get("probe_steps"),
        **{f"ok_{arm}": fam_close(task, fam_value(task, fam_run(
            t, o, 1.0, s, fault=f, arm=arm)), clean, unt, 1.0)
           for arm in FAM_FAULT_ARMS},
        **{f"ok_{name}": fam_close(task, fam_value(task, fam_run(
            t, o, 1.0, s, fault=f, arm=arm_, rules=packs)), clean, unt, 1.0)
           for name, (arm_, packs) in FAM_RULE_ARMS.items()}}


def _by_family(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(family, its rows) in order of appearance, then ("**all**", every row)."""
    for fm in dict.fromkeys(r["family"] for r in rows):
        yield fm, [r for r in rows if r["family"] == fm]
    yield "**all**", list(rows)


def _tuned_table(tr: Sequence[dict[str, Any]]) -> list[str]:
    """What the arms do to the tuned (healthy) runs: within the band, and how many were cut."""
    if not tr:
        return []
    out = ["", "### Tuned runs, watched (within 2 points of the healthy median; cut: the run "
           "ended at a lower rate than configured)", "",
           "| family | runs | bare | defaults | "
           + " | ".join(FAM_RULE_TITLES.get(name, name) for name in FAM_RULE_ARMS) + " |",
           "|---|---|---|---|" + "---|" * len(FAM_RULE_ARMS)]
    for fm, sub in _by_family(tr):
        cells = [f"{sum(r[arm]['ok'] for r in sub)}/{len(sub)} "
                 f"(cut {sum((r[arm]['lr_scale'] or 1.0) < 1.0 for r in sub)})"
                 for arm in ("fixed", *FAM_RULE_ARMS)]
        out.append(f"| {fm} | {len(sub)} | {sum(r['bare_ok'] for r in sub)}/{len(sub)} | "
                   + " | ".join(cells) + " |")
    return out


def _fmt_ceiling(value: float | None) -> str:
    return "none (no evaluation in the steps left)" if value is None else f"{value:.4f}"


def _outcome_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The would-diverge runs split by how their bare run failed (``FAM_OUTCOMES``)."""
    if not rows or not all(r.get("bare_label") for r in rows):
        return []
    arms = ("fixed", "measured", "guard_off", *FAM_RULE_ARMS)
    out = ["", "By how the bare run failed (the detection suite's labeller, "
           "`benchmarks.family_runs.label_natural`):", "",
           "| bare run | runs | " + " | ".join(
               {"fixed": "fixed factors (default)", "measured": "measured rate",
                "guard_off": "guard off"}.get(a, FAM_RULE_TITLES.get(a, a)) for a in arms) + " |",
           "|---|---|" + "---|" * len(arms)]
    for oc in FAM_OUTCOMES:
        sub = [r for r in rows if r["bare_label"]["outcome"] == oc]
        if sub:
            out.append(f"| {oc} | {len(sub)} | " + " | ".join(
                f"{sum(r[a]['ok'] for r in sub if a in r)}/{len(sub)}" for a in arms) + " |")
    missed = [r for r in rows if not r["fixed"]["ok"]]
    idle = [r for r in missed if not r["fixed"].get("rollbacks")]
    ceil = [r for r in missed if r.get("restart_ceiling")]
    late = [r for r in ceil if not r["restart_ceiling"]["ok"]]
    if any("restart_ceiling" in r for r in rows):
        stopped = sum(1 for r in idle if r["fixed"].get("exit_status"))
        out += ["", f"Of the {len(missed)} not healed with the defaults: {len(idle)} without a "
                f"rollback ({sum(r['bare_label']['outcome'] == 'diverged' for r in idle)} of "
                f"them diverged; {stopped} stopped with the best evaluated state); "
                f"{len(missed) - len(idle) - len(ceil)} rolled back to a later snapshot; "
                f"{len(ceil)} restarted from scratch, {len(late)} of them too late for a "
                "restart at the tuned rate to end in the band (the tuned run, stopped where "
                "the budget left after the restart runs out, ends outside it"
                + "".join(f"; {r['task']} {r['opt']} x{r['mult']:g}: restarted after "
                          f"{r['restart_ceiling']['at']} steps, ceiling "
                          + _fmt_ceiling(r["restart_ceiling"]["value"]) for r in late) + ")."]
    return out


def fam_tables(res: dict[str, Any]) -> str:
    rows = [r for r in res["rows"] if r["diverged"]]
    out = ["### Would-diverge configurations (bare run outside the band)", "",
           "| task | family | optimizer | x tuned | seed | bare | bare run's label | "
           "fixed factors (default) | measured (probe=auto) | rollbacks (measured) | "
           "probe steps |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, f = r["measured"], r["fixed"]
        lab = r.get("bare_label") or {}
        kind = lab.get("kind") or lab.get("label", "?")
        out.append(f"| {r['task']} | {r['family']} | {r['opt']} | {r['mult']:g} | {r['seed']} | "
                   f"{r['bare']:.4f} | {kind} | {'✓' if f['ok'] else '✗'} {f['value']:.4f} | "
                   f"{'✓' if m['ok'] else '✗'} {m['value']:.4f} | {m['rollbacks']} | "
                   f"{m['probe_steps']} |")
    n = len(rows)
    out += ["", f"Candidates: {len(res['rows'])}, whose bare run diverged: {n}.", "",
            "| family | diverged | fixed factors (default) | measured rate (probe=auto) | "
            "guard off (not default) | "
            + " | ".join(FAM_RULE_TITLES.get(name, name) for name in FAM_RULE_ARMS) + " |",
            "|---|---|---|---|---|" + "---|" * len(FAM_RULE_ARMS)]
    for fm, sub in _by_family(rows):
        a = sum(r["fixed"]["ok"] for r in sub)
        b = sum(r["measured"]["ok"] for r in sub)
        c = sum(r["guard_off"]["ok"] for r in sub if "guard_off" in r)
        extra = " | ".join(f"{sum(r[name]['ok'] for r in sub if name in r)}/{len(sub)}"
                           for name in FAM_RULE_ARMS)
        out.append(f"| {fm} | {len(sub)} | {a}/{len(sub)} ({a / max(1, len(sub)):.0%}) | "
                   f"{b}/{len(sub)} ({b / max(1, len(sub)):.0%}) | {c}/{len(sub)} | {extra} |")
    out += _outcome_table(rows)
    steps = [r["measured"]["probe_steps"] or 0 for r in rows]
    if steps:
        n = 300 * FAM_BUDGET
        out.append(f"\nProbe cost (share of the {n}-step budget) on diverging runs: median "
                   f"{statistics.median(steps) / n:.1%}, max {max(steps) / n:.1%}; runs "
                   f"over 5%: {sum(s > 0.05 * n for s in steps)}/{len(steps)}.")
    out += _tuned_table(res.get("tuned", []))
    fr = res["faults"]
    out += ["", "### One-off faults on the tuned configuration (within 1 point of the same run "
            "without the fault)", "", "| fault | runs | lrwatch vs the bare run without it | "
            "lrwatch vs the watched run without it | bare vs the bare run without it | "
            + " | ".join(f"{arm} (not default) vs the bare run"
                         for arm in (*FAM_FAULT_ARMS, *FAM_RULE_ARMS))
            + " |", "|---|---|---|---|---|" + "---|" * (len(FAM_FAULT_ARMS) + len(FAM_RULE_ARMS))]
    for f in FAM_FAULTS + ("**all**",):
        sub = fr if f == "**all**" else [r for r in fr if r["fault"] == f]
        a, b = sum(r["ok"] for r in sub), sum(r["bare_ok"] for r in sub)
        c = sum(r["ok_watched"] for r in sub)
        arms = " | ".join(f"{sum(r.get(f'ok_{arm}', False) for r in sub)}/{len(sub)}"
                          for arm in (*FAM_FAULT_ARMS, *FAM_RULE_ARMS))
        out.append(f"| {f} | {len(sub)} | {a}/{len(sub)} ({a / max(1, len(sub)):.0%}) | "
                   f"{c}/{len(sub)} ({c / max(1, len(sub)):.0%}) | {b}/{len(sub)} | {arms} |")
    bad = [r for r in fr if not r["ok"]]
    if bad:
        out += ["", "Faults not within 1 point: " + "; ".join(
            f"{r['task']}/{r['opt']}/{r['fault']}/s{r['seed']} {r['value']:.4f} vs "
            f"{r['clean']:.4f}" for r in bad)]
    return "\n".join(out)


def fam_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description="recovery on the family suite (issue 13)")
    p.add_argument("--families", action="store_true")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated (default: {','.join(FAM_TASKS)}; with --tasks-from: "
                        "the file's)")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated (default: {','.join(FAM_OPTS)}; with --tasks-from: "
                        "the file's)")
    p.add_argument("--tasks-from", default=None, metavar="FILE",
                   help="run the model/task families of a task file instead of the suite's "
                        "(benchmarks/external.py; cache benchmarks/.cache/recovery-<file stem>)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", default=None)
    p.add_argument("--rules", default=None, metavar="FILE",
                   help="a rule file to run every watched arm with instead of the default pack")
    p.add_argument("--schedule", default="constant", choices=dr.SCHEDULES,
                   help="the learning-rate schedule of every run, given to the Watcher as its "
                        "scheduler (default: constant, the suite's protocol)")
    p.add_argument("--budget", type=int, default=1, metavar="K",
                   help="train every run K x the task's 300 steps (default 1, the suite's "
                        "protocol); the healthy median is remeasured at the same budget")
    p.add_argument("--recovery", default=None, metavar="JSON",
                   help='recovery settings every watched arm runs with on top of its own, '
                        'e.g. \'{"start_check_gate": 0}\' (the ablation of a default)')
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    global FAM_RULES, FAM_SCHEDULE, FAM_BUDGET, FAM_CACHE, FAM_RECOVERY
    tasks, opts = list(FAM_TASKS), list(FAM_OPTS)
    if a.tasks_from:
        from benchmarks import external
        try:
            names, file_opts = external.load(a.tasks_from)
        except external.TaskFileError as exc:
            p.error(str(exc))
        tasks, opts = list(names), list(file_opts)
        FAM_CACHE = external.cache_dir("recovery", a.tasks_from)
    tasks = a.tasks.split(",") if a.tasks else tasks
    opts = a.optimizers.split(",") if a.optimizers else opts
    if a.budget < 1:
        p.error(f"--budget must be 1 or more, got {a.budget}")
    FAM_BUDGET = a.budget
    if a.recovery:
        try:
            FAM_RECOVERY = dict(json.loads(a.recovery))
        except (ValueError, TypeError) as exc:
            p.error(f"--recovery must be a JSON object, e.g. '{{\"start_check_gate\": 0}}': {exc}")
    if a.rules:
        FAM_RULES = a.rules
    FAM_SCHEDULE = a.schedule
    if FAM_SCHEDULE != "constant":
        FAM_RULE_ARMS.update(FAM_SCHEDULED_ARMS)
    torch.set_num_threads(1)
    logging.getLogger("lrwatch").setLevel(logging.CRITICAL)
    res = fam_suite(tasks, opts,
                    [int(s) for s in a.seeds.split(",")],
                    progress=(lambda m: None) if a.quiet else
                    (lambda m: print(m, file=sys.stderr, flush=True)))
    print(fam_tables(res))
    if a.json:
        Path(a.json).write_text(json.dumps(_clean(res), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
