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
The mean stays a device tensor: no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

__all__ = ["UNTRAINED_BATCHES", "measure_untrained_loss", "check_untrained_batches"]

#: Batches the untrained loss is measured on. Their median is a level that one unlucky first
#: batch does not set: the autoencoder's first batch read 0.74 where the median of eight is
#: 0.85 (and the first batch of another seed, 0.75 against 1.01). The cost is 8 forward
#: passes once per run (about 3 optimizer steps).
UNTRAINED_BATCHES = 8


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def measure_untrained_loss(model: torch.nn.Module, batches: Sequence[Any],
                           loss_of: Callable[[torch.nn.Module, Any], torch.Tensor]
                           ) -> torch.Tensor | None:
    """The median of ``loss_of(model, batch)`` over ``batches`` (the mean of the two middle
    values for an even count), as a 0-d float32 tensor on the loss's device, with the model,
    its buffers and every random generator as they were.

    Returns ``None`` when there is no batch. Errors from ``loss_of`` propagate (the caller
    decides whether a failed measurement may stop the run).
    """
    if not batches:
        return None
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
            losses = [loss_of(model, b).detach().float().reshape(()) for b in batches]
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
    dev = losses[0].device
    return torch.quantile(torch.stack([x.to(dev) for x in losses]), 0.5)


def check_untrained_batches(n: Any) -> int:
    """The Watcher's ``untrained_batches`` argument, or a :class:`ConfigError` saying what to
    pass."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"untrained_batches must be an integer >= 0 (0: do not measure the "
                          f"untrained loss), got {n!r}")
    return n

