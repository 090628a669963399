"""Real training runs of the family-diverse detection suite: record, inject faults, label.

Every scenario of ``benchmarks/detection.py`` is a real, seeded training run of one task of
``benchmarks/families.py`` (six model/task families: MLP classifiers, CNNs, recurrent and
transformer character language models, MSE regression, autoencoders), recorded step by step as
a trace v1 file. Nothing is downloaded, and no trace is edited after recording.

Faults are *real interventions* in a rerun of a healthy base run (same seed, same data order),
so the trace is the base run's trace until the onset:

``blowup``
    From the onset every group's learning rate is multiplied by 3 at every step, until the run
    overflows.
``lr_bug``
    At the onset the learning rate is multiplied by 100 and stays so (a unit bug).
``collapse``
    At the onset every parameter is set to zero and the optimizer state cleared: a dead
    network, whose loss returns to the level of a constant prediction.
``never_learned``
    The same reset early in the run (onset in steps 3-20): the network never learns.
``spike``
    ``SPIKE_WINDOW`` steps of corrupted batches (targets shuffled within the batch).
``episode``
    A sustained episode: for ``EPISODE_WINDOW`` steps the loss is multiplied by
    ``EPISODE_FACTOR`` before the backward pass (a loss-scaling bug), so the recorded loss and
    the gradient norm are both ``EPISODE_FACTOR`` times larger, and SGD takes larger steps.
``stuck_above``
    From an early onset (steps 3-20) the learning rate is multiplied by ``STUCK_LR_FACTOR``
    (a configuration that takes over after the first steps): an optimizer that bounces around
    in a high-loss region; kept only when the loss really ends above its untrained level.
``eval_regression``
    From the onset a growing share of the training targets is corrupted systematically (class
    ``y -> (y + 1) mod C``; regression ``y -> -y``), 0% to 80% over ``REGRESSION_RAMP`` steps.
``eval_drop``
    A silent evaluation regression with an unchanged training loss, as a broken evaluation or
    serving pipeline gives: from the onset, classification loses exactly ``EVAL_DROP_POINTS``
    (2 points) of held-out accuracy per evaluation (held-out targets the model gets right are
    made wrong, in a fixed random order); regression and autoencoders get a growing share of
    held-out targets corrupted systematically (``EVAL_DROP_RATE`` more per evaluation).

Natural runs vary optimizer (SGD with momentum, Adam, AdamW, RMSprop, plain SGD), schedule
(constant, step, exponential, cosine, cyclical, linear warm-up), batch size (x0.5, x1, x2) and
learning rate (tuned to x100); they are labelled from their loss curve by :func:`label_natural`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks import detection_runs as dr
from benchmarks import families as fam
from lrwatch.samples import Sample
from lrwatch.untrained import (UNTRAINED_BATCHES, OutputShapes, measure_constant_loss,
                               measure_untrained_loss)

__all__ = ["RunSpec", "FAULT_KINDS", "EARLY_FAULTS", "EVAL_FAULTS", "record_run", "run_id",
           "spec_hash", "label_natural", "label_faulted", "TASKS", "FAMILIES"]

FORMAT_VERSION = 4          # 3: step 1 carries untrained_loss (lrwatch.untrained); 4: and constant_loss
EVAL_EVERY = 10               # held-out evaluation every K steps (30 per run)
NONFINITE_TAIL = 10
SPIKE_WINDOW = 30
EPISODE_WINDOW = 60
EPISODE_FACTOR = 5.0
STUCK_LR_FACTOR = 30.0
REGRESSION_RAMP = 150
REGRESSION_MAX = 0.8
EVAL_DROP_RATE = 0.03      # regression/autoencoder: share of held-out rows corrupted per eval
EVAL_DROP_POINTS = 0.02    # classification: accuracy points lost per evaluation
BLOWUP_FACTOR = 3.0
#: The blow-up's ramp stops here: a bounded loss never overflows, and a rate past ~1e38 would
#: overflow inside the optimizer (a Python error, not a non-finite value).
BLOWUP_MAX_LR = 1e30
LR_BUG_FACTOR = 100.0

TASKS = fam.TASKS
FAMILIES = fam.FAMILIES
OPTIMIZERS = ("momentum", "adam", "adamw", "rmsprop", "sgd")
SCHEDULES = dr.SCHEDULES
BATCH_MULTS = (0.5, 1.0, 2.0)
FAULT_KINDS = ("blowup", "lr_bug", "collapse", "never_learned", "spike", "episode",
               "stuck_above", "eval_regression", "eval_drop")
EARLY_FAULTS = ("never_learned", "stuck_above")       # onset in the first steps
EVAL_FAULTS = ("eval_regression", "eval_drop")        # seen through evaluations only


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a recorded run (its hash names the cached trace)."""

    task: str
    optimizer: str
    schedule: str
    lr_mult: float
    seed: int
    batch_mult: float = 1.0
    fault: str | None = None
    onset: int | None = None
    base: str | None = None

    @property
    def family(self) -> str:
        return TASKS[self.task].family

    @property
    def steps(self) -> int:
        return TASKS[self.task].steps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_id(spec: RunSpec) -> str:
    m = f"{spec.lr_mult:g}".replace(".", "p")
    b = f"{spec.batch_mult:g}".replace(".", "p")
    core = f"s{spec.seed}-{spec.task}-{spec.optimizer}-{spec.schedule}-lr{m}-b{b}"
    return core if spec.fault is None else f"{core}-{spec.fault}@{spec.onset}"


def spec_hash(spec: RunSpec) -> str:
    task = TASKS[spec.task]      # the task's tuned LRs and sizes name the run too
    facts = {"v": FORMAT_VERSION, **spec.to_json(), "base_lr": dict(task.base_lr),
             "batch": task.batch, "steps": task.steps}
    if getattr(task, "data", "") in fam.DATA_VERSION:   # only runs whose data changed re-record
        facts["data_v"] = fam.DATA_VERSION[task.data]
    blob = json.dumps(facts, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _apply_lr(opt: torch.optim.Optimizer, sched: Any, factor: float) -> None:
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    for grp in opt.param_groups:
        grp["lr"] *= factor


def _reset(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt.state.clear()


class _Recorder:
    """One run's training loop state (keeps :func:`record_run` short)."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.task = TASKS[spec.task]
        torch.set_num_threads(1)
        self.data = self.task.load(spec.seed)
        torch.manual_seed(spec.seed)
        self.model = self.task.build(self.data)
        lr = self.task.base_lr[spec.optimizer] * spec.lr_mult
        self.opt = fam.make_optimizer(spec.optimizer, self.model, lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, dr._schedule_fn(spec.schedule, self.task.steps))
        self.batch = max(2, int(round(self.task.batch * spec.batch_mult)))
        self.data_g = torch.Generator().manual_seed(3000 + spec.seed)
        self.fault_g = torch.Generator().manual_seed(4000 + spec.seed)
        self.x_eval, self.y_eval = self.data.eval_set()
        eval_g = torch.Generator().manual_seed(5000 + spec.seed)
        self.eval_order = torch.randperm(len(self.y_eval), generator=eval_g)
        self.perm = torch.randperm(self.data.n_train, generator=self.data_g)
        self.cursor = 0
        self.onset = spec.onset if spec.onset is not None else 10 ** 9

    def intervene(self, step: int) -> None:
        f, onset = self.spec.fault, self.onset
        if f in ("collapse", "never_learned") and step == onset:
            _reset(self.model, self.opt)
        elif f == "lr_bug" and step == onset:
            _apply_lr(self.opt, self.sched, LR_BUG_FACTOR)
        elif f == "stuck_above" and step == onset:
            _apply_lr(self.opt, self.sched, STUCK_LR_FACTOR)
        elif f == "blowup" and step >= onset and max(
                g["lr"] for g in self.opt.param_groups) < BLOWUP_MAX_LR:
            _apply_lr(self.opt, self.sched, BLOWUP_FACTOR)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.data.n_train
        if self.cursor + self.batch > n:
            self.perm = torch.randperm(n, generator=self.data_g)
            self.cursor = 0
        idx = self.perm[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        xb, yb = self.data.batch(idx)
        f, onset = self.spec.fault, self.onset
        if f == "spike" and onset <= step < onset + SPIKE_WINDOW:
            yb = self.data.corrupt(yb, torch.ones(len(yb), dtype=torch.bool), self.fault_g,
                                   "shuffle")
        if f == "eval_regression" and step >= onset:
            share = REGRESSION_MAX * min(1.0, (step - onset + 1) / REGRESSION_RAMP)
            mask = torch.rand(len(yb), generator=self.fault_g) < share
            yb = self.data.corrupt(yb, mask, self.fault_g, "systematic")
        return xb, yb

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.model(x)

    def _dropped(self, out: torch.Tensor, step: int) -> torch.Tensor:
        """Held-out targets of the ``eval_drop`` fault at this evaluation (see module doc)."""
        y = self.y_eval
        k = (step - self.onset) // EVAL_EVERY + 1
        if not self.data.n_classes:
            n_bad = min(len(y), int(round(EVAL_DROP_RATE * k * len(y))))
            mask = torch.zeros(len(y), dtype=torch.bool)
            mask[self.eval_order[:n_bad]] = True
            return self.data.corrupt(y, mask, torch.Generator().manual_seed(0), "systematic")
        # classification: exactly EVAL_DROP_POINTS of accuracy per evaluation, taken from the
        # targets the model gets right (in a fixed random order)
        flat = y.reshape(-1).clone()
        right = (out.argmax(-1).reshape(-1) == flat).nonzero().reshape(-1)
        order = right[torch.randperm(len(right), generator=torch.Generator().manual_seed(0))]
        n_bad = min(len(order), int(round(EVAL_DROP_POINTS * k * flat.numel())))
        bad = order[:n_bad]
        flat[bad] = (flat[bad] + 1) % self.data.n_classes
        return flat.reshape(y.shape)

    def evaluate(self, step: int, values: dict[str, float]) -> None:
        self.model.eval()
        y = self.y_eval
        with torch.no_grad():
            out = self.forward(self.x_eval, step)
            if self.spec.fault == "eval_drop" and step >= self.onset:
                y = self._dropped(out, step)
            values["eval_loss"] = float(self.task.loss(out, y))
            acc = self.task.accuracy(out, y)
            if acc is not None:
                values["eval_accuracy"] = float(acc)
        self.model.train()

    def start_levels(self) -> tuple[float, float | None]:
        """What the Watcher measures before the first step (``lrwatch.untrained``): the
        untouched model's median loss on the first batches this run trains on (peeked, not
        consumed; generators, buffers and the data order as they were), and the loss of the
        best constant prediction on them (``None``: not measurable)."""
        n, b = self.data.n_train, self.batch
        batches = [self.data.batch(self.perm[k * b:(k + 1) * b])
                   for k in range(UNTRAINED_BATCHES) if (k + 1) * b <= n]
        loss_of = lambda m, xy: self.task.loss(m(xy[0]), xy[1])  # noqa: E731
        outputs = OutputShapes()
        median = measure_untrained_loss(self.model, batches, loss_of, outputs)
        constant = measure_constant_loss(batches, loss_of, outputs)
        return (float("nan") if median is None else float(median),
                None if constant is None else float(constant))

    def step(self, step: int) -> dict[str, float]:
        untrained, constant = self.start_levels() if step == 1 else (None, None)
        self.intervene(step)
        xb, yb = self.next_batch(step)
        params = [p for p in self.model.parameters()]
        out = self.forward(xb, step)
        loss = self.task.loss(out, yb)
        if self.spec.fault == "episode" and self.onset <= step < self.onset + EPISODE_WINDOW:
            loss = loss * EPISODE_FACTOR
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads, 2.0)) if grads else 0.0
        lrs = tuple(float(g["lr"]) for g in self.opt.param_groups)
        with torch.no_grad():
            before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            after = torch.cat([p.detach().reshape(-1) for p in params])
            pnorm = float(before.norm())
            dnorm = float((after - before).norm())
        values: dict[str, float] = {"lr": lrs[0], "loss": float(loss.detach()),
                                    "grad_norm": grad_norm}
        if untrained is not None:
            values["untrained_loss"] = untrained
        if constant is not None:
            values["constant_loss"] = constant
        if pnorm > 0:          # undefined on a zeroed network: not measured
            values["update_ratio"] = dnorm / pnorm
        acc = self.task.accuracy(out.detach(), yb)
        if acc is not None:
            values["accuracy"] = float(acc)
        if step % EVAL_EVERY == 0:
            self.evaluate(step, values)
        self._lrs = lrs
        return values


def record_run(spec: RunSpec, path: Path) -> dict[str, Any]:
    """Train ``spec`` for real and write its trace to ``path``; returns run facts.

    Deterministic (single-threaded CPU torch). Training stops ``NONFINITE_TAIL`` steps after
    the first non-finite value.
    """
    rec = _Recorder(spec)
    samples: list[Sample] = []
    first_nf: int | None = None
    for step in range(1, rec.task.steps + 1):
        values = rec.step(step)
        samples.append(Sample(step=step, values=values, lr_groups=rec._lrs))
        if first_nf is None and not all(math.isfinite(v) for v in values.values()):
            first_nf = step
        if first_nf is not None and step >= first_nf + NONFINITE_TAIL:
            break
    dr.write_trace(samples, path)
    return {"steps_recorded": len(samples), "first_nonfinite_step": first_nf}


# --------------------------------------------------------------------------------------------
# labelling
# --------------------------------------------------------------------------------------------

TRANSIENT_SHARE = 0.15     # an excursion that ends in the first 15% of the run is a transient
STUCK_LEVEL = 1.5          # natural stuck-above: the final loss is >= 1.5x the untrained loss
DEAD_LEVEL = 0.9           # natural never-learned: final loss >= 0.9x the untrained loss ...
DEAD_BLOWUP = 2.0          # ... after an early excursion above 2x the untrained loss
# natural never-learned, too: the final loss is no lower than the best constant prediction's
# (constant_loss, measured before the first step), whatever the untrained loss was
DEAD_EVALS = 5             # natural dead classifier: the last 5 evaluations at chance ...
CHANCE_MARGIN = 0.01       # ... (within 1 point of the majority class's share)
CHANCE_ONSET_MARGIN = 0.05  # its onset: where the final stretch within 5 points of chance began
                            # (a dead network's accuracy jitters around chance: a last evaluation
                            # 1 point above it is noise, not life)
# A healthy run that over-fits materially: at the end (median of its last 3 evaluations) its
# held-out accuracy is 5 points or more below its best, or its held-out loss 1.25x its best or
# more. Stopping it with the best state restored is early stopping, not a false alarm; an alarm
# is neither required nor counted against (the issue: no false alarm on *slight* over-fitting).
OVERFIT_ACCURACY = 0.05
OVERFIT_LOSS = 1.25
OVERFIT_TAIL = 3


_CHANCE: dict[tuple[str, int], float | None] = {}


def chance_accuracy(task: str, seed: int) -> float | None:
    """Held-out accuracy of the best constant prediction (the majority class's share): what a
    dead classifier scores. ``None`` for regression and autoencoders."""
    key = (task, seed)
    if key not in _CHANCE:
        t = TASKS[task]
        data = t.load(seed)
        if not data.n_classes:
            _CHANCE[key] = None
        else:
            _, y = data.eval_set()
            counts = torch.bincount(y.reshape(-1), minlength=data.n_classes)
            _CHANCE[key] = float(counts.max()) / float(counts.sum())
    return _CHANCE[key]


def _dead_at_chance(samples: Sequence[Sample], chance: float | None) -> int | None:
    """First step of the final stretch of evaluations at chance accuracy (within
    ``CHANCE_MARGIN``), when the last ``DEAD_EVALS`` evaluations are all there; else None."""
    if chance is None:
        return None
    evals = [(x.step, x.values["eval_accuracy"]) for x in samples if "eval_accuracy" in x.values]
    if len(evals) < DEAD_EVALS or any(a > chance + CHANCE_MARGIN for _, a in evals[-DEAD_EVALS:]):
        return None
    i = len(evals) - 1
    while i > 0 and evals[i - 1][1] <= chance + CHANCE_ONSET_MARGIN:
        i -= 1
    return evals[i - 1][0] + 1 if i > 0 else 1


def over_fit(samples: Sequence[Sample]) -> str | None:
    """Why a run over-fitted materially (see ``OVERFIT_ACCURACY``/``OVERFIT_LOSS``), else None."""
    for key, worse in (("eval_accuracy", lambda best, end: best - end >= OVERFIT_ACCURACY),
                       ("eval_loss", lambda best, end: end >= OVERFIT_LOSS * best)):
        vals = [float(x.values[key]) for x in samples if key in x.values]
        vals = [v for v in vals if math.isfinite(v)]
        if len(vals) <= OVERFIT_TAIL:
            continue
        best = max(vals) if key == "eval_accuracy" else min(vals)
        end = float(np.median(vals[-OVERFIT_TAIL:]))
        if worse(best, end):
            return f"{key} ends at {end:.4g} against its best {best:.4g}: materially over-fit"
    return None


def label_natural(samples: Sequence[Sample], chance: float | None = None) -> dict[str, Any]:
    """Label a natural run from its own loss curve.

    Starts from :func:`benchmarks.detection_runs.label_natural` (non-finite or a final loss far
    above its best is *diverged*; learned with no large excursion is *healthy*) and adds:

    * *stuck_above*: finite, and the final loss (median of the last 20 steps) is at least
      ``STUCK_LEVEL`` times the untrained loss. Onset: the first step whose 5-step median is
      above that level after the last one whose centred 20-step median was at or below
      ``HEALTHY_LEARNED`` times the untrained loss (stuck since the run last learned, not
      since its last dip below the level).
    * *never_learned*: finite, and either the held-out accuracy of the last ``DEAD_EVALS``
      evaluations is at chance (within ``CHANCE_MARGIN`` of ``chance``, the majority class's
      share: a dead classifier), or the loss rose above ``DEAD_BLOWUP`` times the untrained
      loss in the first ``TRANSIENT_SHARE`` of the run and the final loss is still at least
      ``DEAD_LEVEL`` times the untrained loss. Onset: the first step above ``DEAD_BLOWUP`` in
      the first ``TRANSIENT_SHARE`` of the run if there is one, else the step after the last
      evaluation above chance. Also *never_learned*: finite, not stuck above, and the final
      loss is at least the loss of the best constant prediction (``constant_loss`` in step 1, measured before
      the first step like the untrained loss; traces without it skip this test): a network
      that, after all its steps, does no better than one fitted output vector has learned
      nothing. Onset: the first step above ``DEAD_BLOWUP`` in the first ``TRANSIENT_SHARE``
      of the run if there is one, else step 1.
    * *healthy* (``transient: true``): a run the base rule calls ambiguous because of a large
      excursion, when that excursion ended within the first ``TRANSIENT_SHARE`` of the run and
      the run then learned (final loss at most 0.8x the untrained loss) -- an early transient
      that the run recovered from on its own.

    A healthy run that over-fitted materially (:func:`over_fit`) keeps its label and gets
    ``over_fit`` (the reason); the scoring neither requires nor counts an alarm on it.
    """
    lab = _label_natural(samples, chance)
    if lab["label"] == "healthy":
        why = over_fit(samples)
        if why is not None:
            lab = {**lab, "over_fit": why}
    return lab


def _label_natural(samples: Sequence[Sample], chance: float | None) -> dict[str, Any]:
    lab = dr.label_natural(samples)
    dead = _dead_at_chance(samples, chance) if lab["first_nonfinite"] is None else None
    if dead is not None:
        _, loss = dr._loss_arrays(samples)
        early = int(math.ceil(TRANSIENT_SHARE * len(loss)))
        blown = np.nonzero(loss[:early] > DEAD_BLOWUP * dr.untrained_level(samples, loss))[0]
        onset = int(blown[0] + 1) if len(blown) else dead
        return {**lab, "label": "diverged", "kind": "never_learned", "onset": onset,
                "reason": f"held-out accuracy at chance ({chance:.3f}) for the last "
                          f"{DEAD_EVALS} evaluations: a dead network"}
    const = constant_level(samples)
    _, loss = dr._loss_arrays(samples)
    if lab["label"] in ("healthy", "ambiguous") and const is not None \
            and const <= lab["final_loss"] < STUCK_LEVEL * dr.untrained_level(samples, loss):
        early = int(math.ceil(TRANSIENT_SHARE * len(loss)))
        blown = np.nonzero(loss[:early] > DEAD_BLOWUP * dr.untrained_level(samples, loss))[0]
        return {**lab, "label": "diverged", "kind": "never_learned",
                "onset": int(blown[0] + 1) if len(blown) else 1,
                "reason": f"final loss {lab['final_loss']:.3g} >= the constant prediction's "
                          f"{const:.3g}: learned nothing a constant output could not"}
    if lab["label"] != "ambiguous" and not (lab["label"] == "diverged"
                                            and lab["first_nonfinite"] is None):
        return lab
    _, loss = dr._loss_arrays(samples)
    init = dr.untrained_level(samples, loss)
    final = lab["final_loss"]
    sm = dr._smoothed(loss)
    n = len(loss)
    early = int(math.ceil(TRANSIENT_SHARE * n))
    if final >= STUCK_LEVEL * init:
        # stuck since it last learned: the first step above the level after the loss was
        # last at or below HEALTHY_LEARNED x untrained (a run that bounces between 1.2x and
        # 20x its untrained loss from step 20 is stuck from step 20, not from its last dip);
        # "learned" on a 20-step median (centred: the labels are made offline), as the final
        # loss is measured, so that a run whose loss swings by orders of magnitude step to
        # step does not "learn" on a dip
        med20 = np.array([np.median(loss[max(0, i - 9):i + 11]) for i in range(n)])
        learned = np.nonzero(med20 <= dr.HEALTHY_LEARNED * init)[0]
        after = int(learned[-1]) + 1 if len(learned) else 0
        above = np.nonzero(sm[after:] >= STUCK_LEVEL * init)[0]
        start = after + int(above[0]) if len(above) else after
        return {**lab, "label": "diverged", "kind": "stuck_above", "onset": int(start + 1),
                "reason": f"final loss {final:.3g} >= {STUCK_LEVEL:g}x untrained {init:.3g}"}
    if lab["label"] == "diverged":
        return lab
    blown = np.nonzero(loss[:early] > DEAD_BLOWUP * init)[0]
    if final >= DEAD_LEVEL * init and len(blown):
        return {**lab, "label": "diverged", "kind": "never_learned",
                "onset": int(blown[0] + 1),
                "reason": f"blew up at step {int(blown[0] + 1)}, final loss {final:.3g} >= "
                          f"{DEAD_LEVEL:g}x untrained {init:.3g}"}
    if final <= dr.HEALTHY_LEARNED * init:
        ref = dr._running_ref(loss)
        big = (sm > dr.HEALTHY_MAX_RISE * ref) & (sm - ref > dr.HEALTHY_MAX_MARGIN * init)
        idx = np.nonzero(big)[0]
        if len(idx) and idx[-1] < early:
            return {**lab, "label": "healthy", "transient": True,
                    "reason": f"early transient (until step {int(idx[-1] + 1)}), then learned"}
    return lab


def constant_level(samples: Sequence[Sample]) -> float | None:
    """The loss of the best constant prediction (``constant_loss`` in step 1, measured by the
    recorder before the first step as the Watcher does), or None when the trace lacks it."""
    c = samples[0].values.get("constant_loss") if samples else None
    return float(c) if c is not None and math.isfinite(c) and c > 0.0 else None


def label_faulted(samples: Sequence[Sample], spec: RunSpec) -> dict[str, Any]:
    """An injected fault: onset is the intervention step. The fault's footprint is measured;
    an early fault without one (``stuck_above`` whose loss came back below the untrained level,
    ``never_learned`` on a network that learned anyway) is *ambiguous*: its class is defined by
    the symptom."""
    assert spec.fault is not None and spec.onset is not None
    lab = dr.label_faulted(samples, spec)   # type: ignore[arg-type]
    _, loss = dr._loss_arrays(samples)
    init = dr.untrained_level(samples, loss)
    final = float(np.median(loss[-20:]))
    lab["final_loss"], lab["initial_loss"] = final, init
    if lab["first_nonfinite"] is None:
        if spec.fault == "stuck_above" and final < STUCK_LEVEL * init:
            return {**lab, "label": "ambiguous",
                    "reason": f"the LR fault left no footprint: final loss {final:.3g} "
                              f"< {STUCK_LEVEL:g}x untrained {init:.3g}"}
        if spec.fault == "never_learned" and final < DEAD_LEVEL * init * 0.5:
            return {**lab, "label": "ambiguous",
                    "reason": f"the reset network learned anyway (final {final:.3g})"}
    return lab
