"""The untrained loss, measured: the model's loss before its first step, over several batches.

The rules that judge a run against where it started (``loss_above_start``, ``never_learned``,
``loss_excursion``, ...) need the loss of the untrained network. The first batch's loss alone
is a noisy estimate of it: on an autoencoder of the detection suite the batch losses at
initialisation range over 2.7x, so a healthy run 0.8x below its real untrained loss read 1.05x
the first batch. Before the first step the Watcher therefore scores the untouched model on the
first ``untrained_batches`` batches of the loop (forward passes only; the batches are then
trained on as usual) and records their median as the metric ``untrained_loss`` in step 1's
sample, where the rules take it through ``given: untrained_loss``.

Why the median, not the mean: the rules and the benchmark's labels compare medians of recent
batch losses with this level, and batch losses can be heavy-tailed. On that autoencoder the 8
batch losses at initialisation are 0.74, 0.75, 0.77, 0.77, 0.92, 1.19, 1.98 and 2.00: mean
1.14, median 0.85; a network that died at a constant prediction has a running median near
0.75, "0.66x its untrained loss" against the mean but 0.88x against the median. On the
classifiers of the suite the two agree within 1%.

Nothing the measurement touches survives it: it runs under ``torch.no_grad()``, in the mode the
model is in (the training loss is measured in training mode, dropout included), with the random
number generators forked and the module buffers (batch-norm running statistics) put back.
The median stays a device tensor: no host synchronisation.

**The constant-prediction loss.** A network that learned nothing about its inputs predicts a
constant: the class frequencies, the mean target, the mean image. Its loss is that of the best
constant prediction, which for most classifiers is close to the untrained loss but for language
models (the unigram entropy, 0.6-0.7x the untrained loss) or models with a learnable output
offset lies well below it. :func:`measure_constant_loss` measures it on the same batches: it
fits one vector ``c`` (the size of the output's last dimension, shared by every sample and
position) that minimises the user's own loss when the model's output is replaced by ``c``
everywhere, and records the median batch loss at that ``c`` as ``constant_loss``. For cross-
entropy that is the entropy of the label frequencies, for a squared error the targets'
variance about their mean. The rules use it as a veto: a network whose loss sits well below it
predicts better than any constant and is not dead (docs/detection.md, "The constant-prediction
loss"). It needs a model whose ``forward`` returns one floating-point tensor and a
``probe_loss`` that calls the model (not its submodules); otherwise it is not measured and the
rules fall back to the first loss. It is measured once, before the first step; its optimiser
(L-BFGS) reads values on the host, so that one measurement synchronises with the device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

__all__ = ["UNTRAINED_BATCHES", "OutputShapes", "measure_untrained_loss", "measure_constant_loss",
           "check_untrained_batches"]

#: Batches the untrained loss is measured on. Their median is a level that one unlucky first
#: batch does not set: the autoencoder's first batch read 0.74 where the median of eight is
#: 0.85 (and the first batch of another seed, 0.75 against 1.01). The cost is 8 forward
#: passes once per run (about 3 optimizer steps).
UNTRAINED_BATCHES = 8


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


class OutputShapes:
    """What the model's ``forward`` returned on each measured batch: its shape, and the mean
    of its outputs over every dimension but the last (where a constant prediction starts).
    ``usable`` is False when some ``forward`` returned something other than one floating-point
    tensor of at least one dimension, or was never called (``loss_of`` used submodules)."""

    def __init__(self) -> None:
        self.shapes: list[torch.Size] = []
        self.dtype: torch.dtype | None = None
        self._sum: torch.Tensor | None = None
        self._rows = 0
        self._bad = False

    def see(self, out: Any) -> None:
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1
                and out.numel() > 0) or (self.shapes and out.shape[-1] != self.shapes[-1][-1]):
            self._bad = True
            return
        flat = out.detach().float().reshape(-1, out.shape[-1])
        self._sum = flat.sum(0) if self._sum is None else self._sum + flat.sum(0)
        self._rows += flat.shape[0]
        self.shapes.append(out.shape)
        self.dtype = out.dtype

    @property
    def usable(self) -> bool:
        return not self._bad and bool(self.shapes)

    @property
    def mean(self) -> torch.Tensor:
        assert self._sum is not None
        return self._sum / self._rows


def measure_untrained_loss(model: torch.nn.Module, batches: Sequence[Any],
                           loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
                           outputs: OutputShapes | None = None,
                           per_batch: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """The median of ``loss_of(model, batch)`` over ``batches`` (the mean of the two middle
    values for an even count), as a 0-d float32 tensor on the loss's device, with the model,
    its buffers and every random generator as they were. With ``outputs``, what the model's
    ``forward`` returned is noted there (for :func:`measure_constant_loss`; one forward hook).
    ``per_batch`` receives each batch's loss (device scalars, in order).

    Returns ``None`` when there is no batch. Errors from ``loss_of`` propagate (the caller
    decides whether a failed measurement may stop the run).
    """
    if not batches:
        return None
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    hook = None if outputs is None else model.register_forward_hook(
        lambda _m, _a, out: outputs.see(out))
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
            losses = []
            for b in batches:
                n = len(outputs.shapes) if outputs is not None else 0
                losses.append(loss_of(model, b).detach().float().reshape(()))
                if outputs is not None and len(outputs.shapes) != n + 1:
                    outputs.see(None)   # no forward, or several: no single output to replace
    finally:
        if hook is not None:
            hook.remove()
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
    if per_batch is not None:
        per_batch.extend(losses)
    dev = losses[0].device
    return torch.quantile(torch.stack([x.to(dev) for x in losses]), 0.5)


def check_untrained_batches(n: Any) -> int:
    """The Watcher's ``untrained_batches`` argument, or a :class:`ConfigError` saying what to
    pass."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"untrained_batches must be an integer >= 0 (0: do not measure the "
                          f"untrained loss), got {n!r}")
    return n


class _Constant(torch.nn.Module):
    """Stands in for the model: returns the same vector ``value`` for every sample and
    position, whatever the input, in the shape the model's output had on that batch."""

    def __init__(self, init: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(init.detach().float().clone())
        self.dtype_out = dtype
        self.shape: torch.Size | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.shape is not None
        return self.value.to(self.dtype_out).expand(self.shape).contiguous()


#: L-BFGS iterations of the constant fit (the losses of the detection suite are convex in the
#: output: cross-entropy, squared error, Poisson). From the untrained model's mean output a
#: classifier or an autoencoder converges within 5; the character language models (96 classes,
#: from nearly uniform to the unigram) are within 0.1% of the 100-iteration value after 25 and
#: 0.8% after 10 (benchmarks/start_levels.py measures the cost).
CONSTANT_FIT_ITERS = 25


def measure_constant_loss(batches: Sequence[Any],
                          loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
                          outputs: OutputShapes) -> torch.Tensor | None:
    """The loss of the best constant prediction on ``batches``: the median over the batches of
    ``loss_of(constant, batch)``, where ``constant`` returns one fitted vector in place of the
    model's output (``outputs``: what :func:`measure_untrained_loss` saw the model return on
    the same batches). ``None`` when it cannot be measured: the outputs were not one tensor
    each, or the fitted loss is not finite and positive. Errors from ``loss_of`` propagate.

    Random generators are left as they were. The model itself is not touched.
    """
    if not batches or not outputs.usable or len(outputs.shapes) != len(batches):
        return None
    assert outputs.dtype is not None
    const = _Constant(outputs.mean, outputs.dtype)
    opt = torch.optim.LBFGS([const.value], lr=1.0, max_iter=CONSTANT_FIT_ITERS,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = const.value.new_zeros(())
        for shape, b in zip(outputs.shapes, batches):
            const.shape = shape
            total = total + loss_of(const, b).float().reshape(())
        total = total / len(batches)
        total.backward()
        return total

    dev = outputs.mean.device
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        opt.step(closure)
        with torch.no_grad():
            losses = []
            for shape, b in zip(outputs.shapes, batches):
                const.shape = shape
                losses.append(loss_of(const, b).detach().float().reshape(()))
    level = torch.quantile(torch.stack([x.to(losses[0].device) for x in losses]), 0.5)
    if not (bool(torch.isfinite(level)) and float(level) > 0.0):
        return None
    return level
