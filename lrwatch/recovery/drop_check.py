"""Whether a dropped step kept its damage off the model.

A step the guard (or a ``GradScaler``) does not apply leaves the parameters as they were, but
its forward pass has already run: a module that updates buffers there (``BatchNorm``'s
running mean and variance) took the bad batch's statistics in. A NaN batch leaves those
statistics NaN for good: training mode normalises with each batch's own statistics, so the
loss looks healthy and no rule fires, while every evaluation of the model (and every
snapshot taken from then on) is NaN. So when a flush holds dropped steps, the model's
parameters and buffers are checked once (one host read, only then); where something is not
finite the drop did not keep the failure off the model, and the policy is told those steps
are *tainted*: it rolls them back like a non-finite failure instead of treating them as
dealt with (:class:`~lrwatch.recovery.policy.Progress`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Sequence

import torch

__all__ = ["nonfinite_state", "tainted_drops"]

log = logging.getLogger("lrwatch")


def nonfinite_state(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """The names of ``model``'s floating parameters and buffers that hold a NaN or an
    infinity (the first ``limit``; one host read): a rollback puts back each of them (a
    buffer registered with ``persistent=False`` too: a snapshot holds those beside the state
    dict, :mod:`~lrwatch.actions.loose_buffers`). Tensors with no values yet (``meta``,
    uninitialized lazy ones) are passed over."""
    # (not state_dict(): a wrapper's can be a collective, FSDP's gathering every shard)
    named = [(n, t) for n, t in itertools.chain(model.named_parameters(),
                                                model.named_buffers())
             if t.is_floating_point() and t.numel() and t.device.type != "meta"
             and not isinstance(t, torch.nn.parameter.UninitializedTensorMixin)]
    # (a shard, FSDP2's DTensor: this rank's part; the ranks' verdicts are gathered)
    local = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named]
    if not local:
        return []
    flags = torch.stack([(~torch.isfinite(t.detach())).any().to(local[0][1].device)
                         for _, t in local]).cpu().tolist()
    return [n for (n, _), bad in zip(local, flags) if bad][:limit]


def tainted_drops(model: torch.nn.Module, dropped: Sequence[int], dist: Any) -> list[int]:
    """The steps of ``dropped`` to roll back after all: all of them when the model holds a
    non-finite parameter or buffer now (the ranks agree under ``torch.distributed``: one
    gather, only at a flush with dropped steps, which every rank judges alike), else none."""
    if not dropped:
        return []
    try:
        bad = nonfinite_state(model)
    except Exception:   # fail open: the drops stay dealt with, as before the check
        log.exception("lrwatch: checking the model after a dropped step failed")
        bad = []
    try:
        everywhere = dist.gather(bad)
    except Exception:   # (inside DDP's Join no collective can run: this rank's own view)
        everywhere = [bad]
    names = next((b for b in everywhere if b), None)
    if not names:
        return []
    log.warning("lrwatch: step %d: the step was not applied, but its forward pass left "
                "non-finite values in the model (%s: a BatchNorm's running statistics take "
                "the batch in before the optimizer step); rolling it back instead",
                min(dropped), ", ".join(names))
    return list(dropped)
