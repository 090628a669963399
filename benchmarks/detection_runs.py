"""Real training runs for the detection benchmark: record them, inject faults, label them.

Every scenario of ``benchmarks/detection.py`` is a real, seeded training run of a small model
on data that ships with scikit-learn (or on the Python standard library's own source code, for the
character-level model), recorded step by step as a trace v1 file. Nothing is downloaded.

Faults are *real interventions* in a run that is otherwise identical to a healthy base run (same
seed, same data order), so the trajectory before the onset is the base run's trajectory:

``blowup``
    From the onset the learning rate of every group is multiplied by 3 at every step, until the
    run overflows (a learning-rate ramp gone wrong, the classic path to ``inf``/``nan``).
``collapse``
    At the onset every parameter is set to zero and the optimizer state is cleared (a bad
    re-initialisation or checkpoint load): the loss returns to its untrained level and the
    gradients vanish, because a zeroed ReLU network has zero hidden activations.
``spike``
    For ``SPIKE_WINDOW`` steps from the onset every training batch is corrupted (targets shuffled
    within the batch, a data-pipeline bug); afterwards clean batches resume.
``lr_bug``
    At the onset the learning rate of every group is multiplied by 100 and stays so (a unit bug).
``eval_regression``
    From the onset a growing share of the training targets is corrupted systematically (class
    ``y -> (y + 1) mod C``; regression ``y -> -y``), ramping linearly from 0 to 80% over
    ``REGRESSION_RAMP`` steps. The training loss barely moves at first; held-out metrics degrade
    slowly.

Natural runs vary model, optimizer, schedule and learning rate (from the tuned value up to 1000x
too high); some really reach ``nan``/``inf``. They are labelled from their loss curve by the rule
in :func:`label_natural` (documented in ``docs/detection.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lrwatch.exporters.trace import TraceWriter, read_trace
from lrwatch.samples import Sample

__all__ = [
    "RunSpec", "Dataset", "TASKS", "OPTIMIZERS", "SCHEDULES", "FAULT_KINDS", "record_run",
    "label_natural", "label_faulted", "first_nonfinite_step", "run_id", "spec_hash",
]

FORMAT_VERSION = 4           # bump when recording changes, so cached traces are rebuilt
EVAL_EVERY = 20              # held-out evaluation every K steps
NONFINITE_TAIL = 10          # steps still recorded after the first non-finite value
SPIKE_WINDOW = 30            # corrupted batches in a sustained spike
REGRESSION_RAMP = 150        # steps over which the eval-regression corruption ramps up
REGRESSION_MAX = 0.8         # final share of corrupted targets in an eval regression
BLOWUP_FACTOR = 3.0          # per-step LR multiplier of a blow-up
LR_BUG_FACTOR = 100.0        # LR multiplier of the learning-rate bug

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup", "step", "exponential", "cyclical")
FAULT_KINDS = ("blowup", "collapse", "spike", "lr_bug", "eval_regression")

# Tuned learning rates (multiplier 1) found by hand on these tasks; the benchmark multiplies them.
BASE_LR = {"sgd": 0.05, "momentum": 0.01, "adam": 2e-3, "adamw": 2e-3, "rmsprop": 1e-3}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int            # 0 for regression
    kind: str                 # "tabular" | "chars"
    context: int = 0          # chars: context length (x are positions into `text`)
    text: torch.Tensor | None = None

    @property
    def classification(self) -> bool:
        return self.n_classes > 0


def _split(x: np.ndarray, y: np.ndarray, seed: int, regression: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1000 + seed)
    idx = rng.permutation(len(x))
    n_test = max(1, len(x) // 5)
    te, tr = idx[:n_test], idx[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = (x - mu) / sd
    if regression:
        ym, ys = y[tr].mean(), y[tr].std() + 1e-8
        y = (y - ym) / ys
    return x[tr], y[tr], x[te], y[te]


def _tabular(name: str, seed: int) -> Dataset:
    from sklearn import datasets as skd

    if name == "digits":
        x, y = skd.load_digits(return_X_y=True)
    elif name == "wine":
        x, y = skd.load_wine(return_X_y=True)
    elif name == "cancer":
        x, y = skd.load_breast_cancer(return_X_y=True)
    elif name == "diabetes":
        x, y = skd.load_diabetes(return_X_y=True)
    elif name == "synth_clf":
        x, y = skd.make_classification(n_samples=2000, n_features=20, n_informative=10,
                                       n_classes=4, n_clusters_per_class=2, flip_y=0.02,
                                       random_state=7)
    elif name == "synth_reg":
        x, y = skd.make_regression(n_samples=2000, n_features=20, n_informative=12,
                                   noise=10.0, random_state=7)
        y = y + 0.02 * y ** 2 / (np.abs(y).max() + 1)  # a little non-linearity for the MLP
    else:
        raise ValueError(f"unknown dataset {name!r}")
    regression = name in ("diabetes", "synth_reg")
    xtr, ytr, xte, yte = _split(x.astype(np.float64), y.astype(np.float64), seed, regression)
    if regression:
        return Dataset(torch.tensor(xtr, dtype=torch.float32),
                       torch.tensor(ytr, dtype=torch.float32).unsqueeze(1),
                       torch.tensor(xte, dtype=torch.float32),
                       torch.tensor(yte, dtype=torch.float32).unsqueeze(1), 0, "tabular")
    return Dataset(torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr, dtype=torch.long),
                   torch.tensor(xte, dtype=torch.float32), torch.tensor(yte, dtype=torch.long),
                   int(y.max()) + 1, "tabular")


_CHAR_FILES = ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py", "string.py",
               "colorsys.py", "calendar.py", "difflib.py")
_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # unknown characters map to index 0


def _chars(seed: int, context: int = 16, limit: int = 150_000) -> Dataset:
    """Next-character prediction over the running Python's own standard-library source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / f).read_text(encoding="utf-8", errors="replace")
             for f in _CHAR_FILES if (root / f).exists()]
    if not parts:
        raise FileNotFoundError(f"no standard-library source files under {root}")
    text = "".join(parts)[:limit]
    table = {c: i for i, c in enumerate(_VOCAB)}
    ids = torch.tensor([table.get(c, 0) for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    pos_train = torch.arange(context, cut)
    g = torch.Generator().manual_seed(2000 + seed)
    pos_test = torch.arange(cut + context, len(ids))
    pos_test = pos_test[torch.randperm(len(pos_test), generator=g)[:2048]]
    return Dataset(pos_train, ids[pos_train], pos_test, ids[pos_test], len(_VOCAB), "chars",
                   context=context, text=ids)


# --------------------------------------------------------------------------------------------
# models and tasks
# --------------------------------------------------------------------------------------------

class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int, emb: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.net = nn.Sequential(nn.Linear(context * emb, hidden), nn.ReLU(),
                                 nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(x).flatten(1))


def _mlp(d_in: int, hidden: Sequence[int], d_out: int) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Task:
    name: str
    data: str
    hidden: tuple[int, ...] | None     # None: a linear model
    batch: int
    steps: int


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits_mlp", "digits", (64,), 32, 400),
    Task("wine_mlp", "wine", (32,), 16, 400),
    Task("cancer_mlp", "cancer", (32, 16), 32, 400),
    Task("diabetes_linear", "diabetes", None, 32, 400),
    Task("diabetes_mlp", "diabetes", (32,), 32, 400),
    Task("synth_clf_mlp", "synth_clf", (64, 64), 32, 400),
    Task("synth_reg_mlp", "synth_reg", (64,), 32, 400),
    Task("chars_mlp", "chars", (128,), 64, 400),
)}


def load_data(task: Task, seed: int) -> Dataset:
    return _chars(seed) if task.data == "chars" else _tabular(task.data, seed)


def build_model(task: Task, data: Dataset) -> nn.Module:
    if data.kind == "chars":
        return CharMLP(data.n_classes, data.context, hidden=task.hidden[0] if task.hidden else 128)
    d_in = data.x_train.shape[1]
    d_out = data.n_classes if data.classification else 1
    if task.hidden is None:
        return nn.Linear(d_in, d_out)
    return _mlp(d_in, task.hidden, d_out)


# --------------------------------------------------------------------------------------------
# run specification
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a recorded run (its hash names the cached trace)."""

    task: str
    optimizer: str
    schedule: str
    lr_mult: float
    seed: int
    steps: int
    fault: str | None = None
    onset: int | None = None
    base: str | None = None          # run id of the healthy run a fault was injected into

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_id(spec: RunSpec) -> str:
    m = f"{spec.lr_mult:g}".replace(".", "p")
    core = f"s{spec.seed}-{spec.task}-{spec.optimizer}-{spec.schedule}-lr{m}"
    return core if spec.fault is None else f"{core}-{spec.fault}@{spec.onset}"


def spec_hash(spec: RunSpec) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **spec.to_json()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _schedule_fn(name: str, steps: int) -> Callable[[int], float]:
    """LR multiplier at optimizer step index ``t`` (0-based), as ``LambdaLR`` applies it."""
    if name == "constant":
        return lambda t: 1.0
    if name == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    if name == "warmup":               # linear warmup over 10% of the run, then cosine decay
        w = max(1, steps // 10)
        return lambda t: (t + 1) / w if t < w else 0.5 * (
            1 + math.cos(math.pi * (t - w) / max(1, steps - w)))
    if name == "step":                 # halve every 100 steps
        return lambda t: 0.5 ** (t // 100)
    if name == "exponential":
        return lambda t: 0.995 ** t
    if name == "cyclical":             # triangular, between 0.1x and 1x, 50 steps up, 50 down
        return lambda t: 0.1 + 0.9 * (1 - abs((t % 100) / 50 - 1))
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from benchmarks.families import make_optimizer   # one definition of the suite's optimizers
    return make_optimizer(name, model, lr)


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------

def _batch(data: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if data.kind == "chars":
        assert data.text is not None
        pos = data.x_train[idx]
        offs = torch.arange(-data.context, 0)
        return data.text[pos.unsqueeze(1) + offs], data.y_train[idx]
    return data.x_train[idx], data.y_train[idx]


def _eval_inputs(data: Dataset) -> torch.Tensor:
    if data.kind == "chars":
        assert data.text is not None
        offs = torch.arange(-data.context, 0)
        return data.text[data.x_test.unsqueeze(1) + offs]
    return data.x_test


def _corrupt(y: torch.Tensor, data: Dataset, mask: torch.Tensor, g: torch.Generator,
             mode: str) -> torch.Tensor:
    """Corrupted targets where ``mask``: shuffled within the batch, or systematically wrong."""
    y = y.clone()
    if not bool(mask.any()):
        return y
    if mode == "shuffle":
        perm = torch.randperm(len(y), generator=g)
        y[mask] = y[perm][mask]
    elif data.classification:
        y[mask] = (y[mask] + 1) % data.n_classes
    else:
        y[mask] = -y[mask]
    return y


def record_run(spec: RunSpec, path: Path, data: Dataset | None = None) -> dict[str, Any]:
    """Train ``spec`` for real and write its trace to ``path``; returns run facts.

    Deterministic: the same spec gives the same trace (single-threaded CPU torch). Training stops
    ``NONFINITE_TAIL`` steps after the first non-finite value.
    """
    task = TASKS[spec.task]
    torch.set_num_threads(1)
    data = data if data is not None else load_data(task, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(task, data)
    lr = BASE_LR[spec.optimizer] * spec.lr_mult
    opt = _optimizer(spec.optimizer, model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule_fn(spec.schedule, spec.steps))
    loss_fn: nn.Module = nn.CrossEntropyLoss() if data.classification else nn.MSELoss()
    params = [p for p in model.parameters()]
    data_g = torch.Generator().manual_seed(3000 + spec.seed)      # batch order
    fault_g = torch.Generator().manual_seed(4000 + spec.seed)     # corruption draws only
    x_eval, y_eval = _eval_inputs(data), data.y_test
    n = len(data.x_train)
    perm = torch.randperm(n, generator=data_g)
    cursor = 0
    first_nf: int | None = None
    samples: list[Sample] = []
    onset = spec.onset if spec.onset is not None else 10 ** 9

    for step in range(1, spec.steps + 1):
        # ---- interventions that act before this step's forward pass ----
        if spec.fault == "collapse" and step == onset:
            with torch.no_grad():
                for p in params:
                    p.zero_()
            opt.state.clear()
        if spec.fault == "lr_bug" and step == onset:
            sched.base_lrs = [b * LR_BUG_FACTOR for b in sched.base_lrs]
            for grp in opt.param_groups:
                grp["lr"] *= LR_BUG_FACTOR
        if spec.fault == "blowup" and step >= onset:
            sched.base_lrs = [b * BLOWUP_FACTOR for b in sched.base_lrs]
            for grp in opt.param_groups:
                grp["lr"] *= BLOWUP_FACTOR

        if cursor + task.batch > n:
            perm = torch.randperm(n, generator=data_g)
            cursor = 0
        idx = perm[cursor:cursor + task.batch]
        cursor += task.batch
        xb, yb = _batch(data, idx)
        if spec.fault == "spike" and onset <= step < onset + SPIKE_WINDOW:
            yb = _corrupt(yb, data, torch.ones(len(yb), dtype=torch.bool), fault_g, "shuffle")
        if spec.fault == "eval_regression" and step >= onset:
            share = REGRESSION_MAX * min(1.0, (step - onset + 1) / REGRESSION_RAMP)
            mask = torch.rand(len(yb), generator=fault_g) < share
            yb = _corrupt(yb, data, mask, fault_g, "systematic")

        model.train()
        out = model(xb)
        loss = loss_fn(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads, 2.0)) if grads else 0.0
        lrs = tuple(float(g["lr"]) for g in opt.param_groups)
        with torch.no_grad():
            before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        opt.step()
        sched.step()
        with torch.no_grad():
            after = torch.cat([p.detach().reshape(-1) for p in params])
            pnorm = float(before.norm())
            dnorm = float((after - before).norm())
        values: dict[str, float] = {"lr": lrs[0], "loss": float(loss.detach()),
                                    "grad_norm": grad_norm}
        # A zeroed network has ||theta|| = 0: the ratio is undefined there, so it is not
        # recorded (a missing key means "not measured") rather than written as inf.
        if pnorm > 0:
            values["update_ratio"] = dnorm / pnorm
        if data.classification:
            values["accuracy"] = float((out.detach().argmax(1) == yb).float().mean())
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                eo = model(x_eval)
                values["eval_loss"] = float(loss_fn(eo, y_eval))
                if data.classification:
                    values["eval_accuracy"] = float((eo.argmax(1) == y_eval).float().mean())
        samples.append(Sample(step=step, values=values, lr_groups=lrs))
        if first_nf is None and not all(math.isfinite(v) for v in values.values()):
            first_nf = step
        if first_nf is not None and step >= first_nf + NONFINITE_TAIL:
            break

    write_trace(samples, path)
    return {"steps_recorded": len(samples), "first_nonfinite_step": first_nf}


def write_trace(samples: Sequence[Sample], path: Path) -> None:
    """Write ``samples`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with TraceWriter(tmp) as w:
        w.write_many(samples)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# labelling
# --------------------------------------------------------------------------------------------

KEYS_CHECKED = ("loss", "grad_norm", "update_ratio", "accuracy", "eval_loss", "eval_accuracy",
                "lr")
ONSET_K = 2.0              # an excursion is a loss above K x the running minimum ...
ONSET_MARGIN = 0.1         # ... and above it by at least 0.1 x the initial loss (so that a
                           # rise from 0.001 to 0.003 near convergence is not an excursion)
SMOOTH = 5                 # causal rolling median used for the running minimum
EXCURSION_GAP = 4          # dips of up to this many steps do not end an excursion
HEALTHY_LEARNED = 0.8      # healthy: final loss <= 0.8 x initial loss
HEALTHY_MAX_RISE = 3.0     # healthy: smoothed loss never above 3 x its running minimum
HEALTHY_MAX_MARGIN = 0.2   # ... by more than 0.2 x the initial loss
DIVERGED_FINAL = 4.0       # finite divergence: final loss > 4 x best and > initial loss


def first_nonfinite_step(samples: Sequence[Sample]) -> int | None:
    for s in samples:
        for k in KEYS_CHECKED:
            v = s.values.get(k)
            if v is not None and not math.isfinite(v):
                return s.step
        if s.lr_groups and not all(math.isfinite(v) for v in s.lr_groups):
            return s.step
    return None


def _loss_arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([s.step for s in samples])
    loss = np.array([s.values.get("loss", math.nan) for s in samples], dtype=float)
    loss = np.where(np.isfinite(loss), loss, np.inf)
    return steps, loss


def untrained_level(samples: Sequence[Sample], loss: np.ndarray) -> float:
    """The untrained loss a label is judged against: the mean loss of the untouched model over
    the first batches (``untrained_loss`` in step 1, what the Watcher measures; traces from
    recording version 3 on), else the first batch's loss."""
    if samples:
        u = samples[0].values.get("untrained_loss")
        if u is not None and math.isfinite(u) and u > 0.0:
            return float(u)
    return float(loss[0])


def _smoothed(loss: np.ndarray) -> np.ndarray:
    return np.array([np.median(loss[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(loss))])


def _running_ref(loss: np.ndarray) -> np.ndarray:
    """ref[i] = min of the smoothed loss strictly before i (ref[0] = loss[0])."""
    sm = _smoothed(loss)
    ref = np.empty_like(loss)
    cur = loss[0]
    for i in range(len(loss)):
        ref[i] = cur
        cur = min(cur, sm[i])
    return ref


def _above(loss: np.ndarray, ref: np.ndarray, init: float) -> np.ndarray:
    """Steps in an excursion: loss > K x running minimum and > running minimum + margin."""
    with np.errstate(invalid="ignore"):
        return (loss > ONSET_K * ref) & (loss - ref > ONSET_MARGIN * init)


def _final_excursion_start(above: np.ndarray, end: int) -> int:
    """Index where the last excursion (``above``, gaps <= EXCURSION_GAP) ending at ``end``
    began. ``end`` itself is taken as part of the excursion."""
    i = end
    start = end
    gap = 0
    while i > 0:
        i -= 1
        if above[i]:
            start = i
            gap = 0
        else:
            gap += 1
            if gap > EXCURSION_GAP:
                break
    return start


def label_natural(samples: Sequence[Sample]) -> dict[str, Any]:
    """Label a natural (not fault-injected) run from its own curves.

    * ``diverged`` if any recorded value is non-finite, or the final loss (median of the last 20
      steps) is above the initial loss (the loss of step 1, before any update) *and* above 4x the
      best smoothed loss. Onset: the first step of the last excursion of the loss above 2x its running minimum
      *and* above it by 0.1x the initial loss (running minimum of a causal 5-step median; dips of
      up to 2 steps do not end the excursion; non-finite losses count as above), ending at the
      first non-finite step or the last step above.
    * ``healthy`` if all values are finite, the final loss is at most 0.8x the initial loss, and
      the smoothed loss never rises above 3x its running minimum by more than 0.2x the initial
      loss.
    * ``ambiguous`` otherwise (did not learn, or recovered from a large excursion); excluded from
      scoring and listed in the manifest.
    """
    steps, loss = _loss_arrays(samples)
    nf = first_nonfinite_step(samples)
    init = untrained_level(samples, loss)   # the untrained loss, measured before any update
    tail = loss[-20:]
    final = float(np.median(tail))
    sm = _smoothed(loss)
    ref = _running_ref(loss)
    best = float(np.min(sm))
    with np.errstate(invalid="ignore", divide="ignore"):
        big = (sm > HEALTHY_MAX_RISE * ref) & (sm - ref > HEALTHY_MAX_MARGIN * init)
        rise_ratio = np.where(ref > 0, sm / np.where(ref > 0, ref, 1.0), np.inf)
    rise = float(np.max(rise_ratio[big])) if big.any() else 1.0
    above = _above(loss, ref, init)
    facts = {"initial_loss": init, "final_loss": final, "best_smoothed_loss": best,
             "largest_excursion_ratio": rise}
    if nf is not None or (final > init and final > DIVERGED_FINAL * best):
        end = int(np.searchsorted(steps, nf)) if nf is not None else len(loss) - 1
        if nf is None:   # end the excursion at the last step that is above threshold
            idx = np.nonzero(above)[0]
            end = int(idx[-1]) if len(idx) else end
        start = _final_excursion_start(above, end)
        return {"label": "diverged", "onset": int(steps[start]), "first_nonfinite": nf,
                "reason": "non-finite values" if nf is not None else
                f"final loss {final:.3g} > initial {init:.3g} and > {DIVERGED_FINAL:g}x best "
                f"{best:.3g}", **facts}
    if final <= HEALTHY_LEARNED * init and not big.any():
        return {"label": "healthy", "onset": None, "first_nonfinite": None,
                "reason": "learned, finite, no large excursion", **facts}
    why = (f"did not learn (final {final:.3g} > {HEALTHY_LEARNED:g}x initial {init:.3g})"
           if final > HEALTHY_LEARNED * init else
           f"smoothed loss rose to {rise:.3g}x its running minimum and recovered")
    return {"label": "ambiguous", "onset": None, "first_nonfinite": None, "reason": why, **facts}


def label_faulted(samples: Sequence[Sample], spec: RunSpec) -> dict[str, Any]:
    """A fault-injected run: onset is the intervention step; we also measure whether the fault
    left a visible mark on the loss (for the honest record, not for scoring)."""
    assert spec.fault is not None and spec.onset is not None
    steps, loss = _loss_arrays(samples)
    nf = first_nonfinite_step(samples)
    i0 = int(np.searchsorted(steps, spec.onset))
    pre = float(np.median(loss[max(0, i0 - 20):i0])) if i0 > 0 else math.nan
    post = loss[i0:i0 + 30]
    peak = float(np.max(post)) if len(post) else math.nan
    evals = [(s.step, s.values["eval_loss"]) for s in samples if "eval_loss" in s.values]
    ev_pre = [v for st, v in evals if st < spec.onset]
    ev_post = [v for st, v in evals if st >= spec.onset]
    return {"label": "faulted", "fault": spec.fault, "onset": spec.onset, "first_nonfinite": nf,
            "reason": "injected by a real intervention at the onset step",
            "loss_before_onset": pre, "loss_peak_after_onset": peak,
            "eval_loss_before_onset": ev_pre[-1] if ev_pre else None,
            "eval_loss_last": ev_post[-1] if ev_post else None}


def load_samples(path: Path) -> list[Sample]:
    return read_trace(path)


def seeded_choice(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[rng.randrange(len(seq))]
