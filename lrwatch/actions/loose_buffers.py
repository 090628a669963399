"""A model's buffers that its ``state_dict()`` leaves out, for snapshots (and the best
evaluated state, :func:`~lrwatch.actions.best.model_state`).

A buffer registered with ``register_buffer(..., persistent=False)`` (a running statistic kept
for evaluation, a rotary table, a causal mask) is in no ``state_dict()``, so a snapshot of the
model's state dict does not hold it and a rollback would leave it as the abandoned steps left
it: a running mean poisoned by a NaN batch stayed NaN after the rollback. A snapshot holds
them beside the state dict (``"buffers"``, plain CPU tensors, so a snapshot file holds them
too), and the restore puts them back:

- :func:`loose_buffers`: the live tensors, by their names in ``model`` (this rank's own
  tensors: read off the modules, no collective; a ``DTensor`` buffer's local part);
- :func:`restore_loose`: a captured set back into ``model``, in place where the buffer is
  still of its shape, else rebound to a tensor of the captured shape on the live buffer's
  device (a cache that grew since); a buffer the model no longer has, or had none of then,
  is passed over.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["loose_buffers", "restore_loose"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s part on this rank, else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _slots(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    return {f"{m}.{b}" if m else b: (mod, b) for m, mod in model.named_modules()
            for b in sorted(getattr(mod, "_non_persistent_buffers_set", ()))
            if isinstance(mod._buffers.get(b), torch.Tensor)}


def loose_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s buffers registered with ``persistent=False``, live (not copies), by name;
    tensors that hold no values yet (``meta``, a lazy module's) are passed over."""
    out = {}
    for name, (mod, b) in _slots(model).items():
        t = mod._buffers[b]
        if t.device.type != "meta" and not isinstance(
                t, torch.nn.parameter.UninitializedTensorMixin):
            out[name] = _local(t).detach()
    return out


def restore_loose(model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put ``saved`` (copies of :func:`loose_buffers`) back into ``model``."""
    slots = _slots(model)
    with torch.no_grad():
        for name, src in saved.items():
            if name not in slots:
                continue
            mod, b = slots[name]
            live = _local(mod._buffers[b])
            if live.device.type == "meta":
                continue
            if live.shape == src.shape:
                live.copy_(src, non_blocking=src.is_pinned())
            elif not hasattr(mod._buffers[b], "to_local"):
                dtype = live.dtype if live.is_floating_point() and src.is_floating_point() \
                    else src.dtype
                mod._buffers[b] = src.to(device=live.device, dtype=dtype, copy=True)
