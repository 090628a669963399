"""Re-implementations of the documented default decision rules of well-known training monitors.

Each anchor is a small streaming object: ``update(sample) -> bool`` consumes one trace sample (one
optimizer step) and returns ``True`` when the anchor *fires* at that step. Every anchor stops,
skips or aborts when it fires, so the benchmark treats each firing as critical. After a firing
the anchor keeps its state and goes on (the benchmark replays whole traces), following the
original code path as if the exception had been caught.

These are written from the projects' documentation and documented behaviour, for back-testing on
recorded traces; no code is copied. Where the original depends on something a trace does not
carry, the comment says what we did instead.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Protocol

from lrwatch.samples import Sample

__all__ = [
    "Anchor", "KerasTerminateOnNaN", "LightningSpikeDetection", "LlmFoundryKillLossSpike",
    "OlmoCoreSkipStep", "MegatronSpikyLoss", "RiverPageHinkley", "LightningEarlyStopping",
    "ANCHORS", "make_anchors",
]


class Anchor(Protocol):
    name: str

    def update(self, sample: Sample) -> bool: ...


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


class KerasTerminateOnNaN:
    """Keras ``callbacks.TerminateOnNaN()``: at the end of every batch, if the logged ``loss`` is
    NaN or infinite, stop training. No parameters."""

    name = "keras TerminateOnNaN"

    def update(self, sample: Sample) -> bool:
        loss = sample.get("loss")
        return loss is not None and not math.isfinite(loss)


class LightningSpikeDetection:
    """Lightning Fabric ``SpikeDetection(mode="min", window=10, warmup=1, atol=None, rtol=2.0,
    finite_only=True)``.

    Documented behaviour mirrored: a running mean over the last ``window`` accepted losses is the
    reference. From batch index ``warmup`` on, a loss is a spike when it is non-finite (with
    ``finite_only=True``), or when it is not an improvement over the previous accepted loss and
    ``|loss - mean| >= rtol * mean`` (the ``atol`` test is off with ``atol=None``). A spike raises
    ``TrainingSpikeException``; only non-spike losses update the running mean.
    Deviation: Lightning's ``batch_idx`` restarts every epoch; a trace has no epochs, so the
    warmup counts from the first step of the run.
    """

    name = "Lightning SpikeDetection"

    def __init__(self, window: int = 10, warmup: int = 1, rtol: float | None = 2.0,
                 atol: float | None = None, finite_only: bool = True) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.warmup = warmup
        self.rtol = rtol
        self.atol = atol
        self.finite_only = finite_only
        self.last_val = 0.0
        self.batch_idx = 0

    def _is_spike(self, loss: float) -> bool:
        running = sum(self.window) / len(self.window) if self.window else math.nan
        if self.finite_only and not math.isfinite(loss):
            return True
        if loss - self.last_val <= 0.0:      # an improvement is never a spike
            return False
        ok_atol = self.atol is None or abs(loss - running) >= abs(self.atol)
        ok_rtol = self.rtol is None or abs(loss - running) >= abs(self.rtol * running)
        return ok_atol and ok_rtol

    def update(self, sample: Sample) -> bool:
        loss = sample.get("loss")
        if loss is None:
            return False
        spike = self.batch_idx >= self.warmup and self._is_spike(loss)
        self.batch_idx += 1
        if spike:
            return True
        if self.finite_only or math.isfinite(loss):
            self.window.append(loss)
            self.last_val = loss
        return False


class LlmFoundryKillLossSpike:
    """llm-foundry ``KillLossSpike(patience=4, outlier_multiplier=2, window_size=100,
    loss_cap=10)`` with ``log_only=False`` (it raises instead of only logging).

    Documented behaviour mirrored: once the rolling window holds ``window_size`` losses, a loss
    ``>= outlier_multiplier x`` the window mean is an outlier; more than ``patience`` consecutive
    outliers (so 5) raise ``LossSpikeError``; a non-outlier resets the count. Otherwise, from step
    ``2 x window_size`` on, if at least half the window is above ``loss_cap`` it raises
    ``HighLossError``. Every loss (finite or not) enters the window afterwards.
    """

    name = "llm-foundry KillLossSpike"

    def __init__(self, patience: int = 4, outlier_multiplier: float = 2.0,
                 window_size: int = 100, loss_cap: float = 10.0) -> None:
        self.patience = patience
        self.mult = outlier_multiplier
        self.window_size = window_size
        self.loss_cap = loss_cap
        self.window: deque[float] = deque(maxlen=window_size)
        self.outliers = 0

    def update(self, sample: Sample) -> bool:
        loss = sample.get("loss")
        if loss is None:
            return False
        fired = False
        if len(self.window) == self.window_size:
            avg = sum(self.window) / len(self.window)
            if loss >= avg * self.mult:                  # False for NaN, like numpy
                self.outliers += 1
                fired = self.outliers > self.patience
            elif self.outliers > 0:
                self.outliers = 0
            if not fired and sample.step >= 2 * self.window_size:
                high = sum(1 for v in self.window if v > self.loss_cap)
                fired = high >= self.window_size / 2
        self.window.append(loss)
        return fired


class OlmoCoreSkipStep:
    """OLMo-core ``SkipStepOptimizer(rolling_interval_length=128, sigma_factor=6)`` (as used by
    ``SkipStepAdamW``).

    Documented behaviour mirrored: the optimizer keeps the last ``rolling_interval_length + 1``
    losses and grad norms (the current one included). Once it holds at least
    ``max(20, rolling_interval_length // 2)`` losses, the step is skipped unless the current
    loss's and grad norm's absolute z-scores against the mean and (unbiased) standard deviation of
    the earlier values are both ``<= sigma_factor``. As with tensors, a NaN z-score (a NaN value,
    or 0/0) fails the test, so the step is skipped. A skipped step is the firing.
    """

    name = "OLMo-core skip-step"

    def __init__(self, rolling_interval_length: int = 128, sigma_factor: float = 6.0) -> None:
        self.n = rolling_interval_length
        self.sigma = sigma_factor
        self.losses: deque[float] = deque(maxlen=rolling_interval_length + 1)
        self.grad_norms: deque[float] = deque(maxlen=rolling_interval_length + 1)

    @staticmethod
    def _z(values: deque[float]) -> float:
        prev = list(values)[:-1]
        cur = values[-1]
        if len(prev) < 2 or not all(math.isfinite(v) for v in prev) or not math.isfinite(cur):
            return math.nan
        mean = math.fsum(prev) / len(prev)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in prev) / (len(prev) - 1))
        diff = abs(cur - mean)
        if std == 0.0:
            return math.nan if diff == 0.0 else math.inf
        return diff / std

    def update(self, sample: Sample) -> bool:
        loss = sample.get("loss")
        if loss is None:
            return False
        self.losses.append(loss)
        gn = sample.get("grad_norm")
        if gn is not None:
            self.grad_norms.append(gn)
        if len(self.losses) < max(20, self.n // 2):
            return False
        ok = self._z(self.losses) <= self.sigma            # NaN <= x is False: skip
        if self.grad_norms:
            ok = ok and self._z(self.grad_norms) <= self.sigma
        return not ok


class MegatronSpikyLoss:
    """Megatron-LM's loss validation with ``--check-for-spiky-loss`` on, plus its default
    non-finite checks.

    Documented behaviour mirrored: ``RerunStateMachine.is_unexpectedly_large(loss, threshold=10,
    context="loss")`` records the maximum absolute loss over the first ``num_samples=100`` finite
    losses (non-finite values are ignored there, being checked separately) and afterwards flags a
    loss ``>= 10 x`` that maximum. The separate default checks (``check_for_nan_in_loss`` and the
    grad-norm NaN/Inf check) flag any non-finite loss or gradient norm.
    """

    name = "Megatron spiky-loss"

    def __init__(self, threshold: float = 10.0, num_samples: int = 100) -> None:
        self.threshold = threshold
        self.num_samples = num_samples
        self.count = 0
        self.max_value = 0.0

    def update(self, sample: Sample) -> bool:
        loss = sample.get("loss")
        gn = sample.get("grad_norm")
        if (loss is not None and not math.isfinite(loss)) or (gn is not None
                                                              and not math.isfinite(gn)):
            return True
        if loss is None:
            return False
        value = abs(loss)
        if self.count < self.num_samples:
            self.count += 1
            self.max_value = max(self.max_value, value)
            return False
        return value >= self.max_value * self.threshold


class RiverPageHinkley:
    """river ``drift.PageHinkley(min_instances=30, delta=0.005, threshold=50.0,
    alpha=1 - 0.0001, mode="both")`` fed the training loss.

    Documented behaviour mirrored: a running mean of all values; cumulative sums of the
    deviations from it, with forgetting factor ``alpha`` and slack ``delta``, one for increases
    and one for decreases; after ``min_instances`` values, a drift is detected when either sum
    departs from its extremum by more than ``threshold``. After a detection the detector resets
    on the next value. Non-finite values propagate through the mean as they do in river (so a
    NaN loss silences it).
    """

    name = "river PageHinkley"

    def __init__(self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both") -> None:
        if mode not in ("up", "down", "both"):
            raise ValueError(f"mode must be one of 'up', 'down', 'both'; got {mode!r}")
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.mode = mode
        self.drift_detected = False
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.sum_inc = 0.0
        self.sum_dec = 0.0
        self.min_inc = math.inf
        self.max_dec = -1.0
        self.drift_detected = False

    def update(self, sample: Sample) -> bool:
        x = sample.get("loss")
        if x is None:
            return False
        if self.drift_detected:
            self._reset()
        self.n += 1
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_inc = self.alpha * self.sum_inc + dev - self.delta
        self.sum_dec = self.alpha * self.sum_dec + dev + self.delta
        if self.sum_inc < self.min_inc:
            self.min_inc = self.sum_inc
        if self.sum_dec > self.max_dec:
            self.max_dec = self.sum_dec
        if self.n >= self.min_instances:
            up = self.sum_inc - self.min_inc > self.threshold
            down = self.max_dec - self.sum_dec > self.threshold
            self.drift_detected = {"up": up, "down": down, "both": up or down}[self.mode]
        return self.drift_detected


class LightningEarlyStopping:
    """Lightning ``EarlyStopping(monitor="val_loss", patience=3)`` with its other defaults
    (``mode="min"``, ``min_delta=0.0``, ``check_finite=True``, no stopping or divergence
    threshold), checked after every validation run; our validation metric is ``eval_loss``.

    Documented behaviour mirrored: a non-finite monitored value stops at once; an improvement
    (strictly below the best so far) resets the wait count; otherwise the count grows and
    training stops when it reaches ``patience``.
    """

    name = "Lightning EarlyStopping(patience=3)"

    def __init__(self, monitor: str = "eval_loss", patience: int = 3,
                 min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.wait = 0

    def update(self, sample: Sample) -> bool:
        cur = sample.get(self.monitor)
        if cur is None:
            return False
        if not math.isfinite(cur):
            return True
        if cur - self.min_delta < self.best:
            self.best = cur
            self.wait = 0
            return False
        self.wait += 1
        return self.wait >= self.patience


ANCHORS: dict[str, Callable[[], Anchor]] = {
    "keras_terminate_on_nan": KerasTerminateOnNaN,
    "lightning_spike_detection": LightningSpikeDetection,
    "llmfoundry_kill_loss_spike": LlmFoundryKillLossSpike,
    "olmo_core_skip_step": OlmoCoreSkipStep,
    "megatron_spiky_loss": MegatronSpikyLoss,
    "river_page_hinkley": RiverPageHinkley,
    "lightning_early_stopping": LightningEarlyStopping,
}


def make_anchors() -> dict[str, Anchor]:
    """A fresh instance of every anchor, keyed by its short id."""
    return {key: factory() for key, factory in ANCHORS.items()}
