"""A learning-rate scheduler's part of a snapshot, for schedulers of every kind.

torch's schedulers hand out their state with ``state_dict()``; a scheduler of one's own may
have none (an object with a ``step()`` that sets the rates), and a torch scheduler's state
may hold objects of the user's: ``LambdaLR``/``MultiplicativeLR`` keep the ``__dict__`` of a
callable object given as the lambda, ``CyclicLR`` a ``scale_fn`` object's. Such a state is
fine in memory, but a snapshot on disk is written with ``torch.save`` and read back with
``torch.load(weights_only=True)``: an attribute holding a lambda could not be written (every
snapshot failed, and a rollback had nowhere to go), one holding a logger or any class of the
user's could not be read back (the rollback failed and stopped the run). Here:

- :func:`scheduler_state`: ``None`` for a scheduler without ``state_dict()`` (the snapshot
  holds the rest; :func:`restorable` says whether a restore can put a state back);
- :func:`storable`: whether a state survives the round trip through a snapshot file; one
  that does not is kept in memory beside the file (:class:`~lrwatch.actions.snapshot.
  Snapshot`), a few numbers and references, not the model's weights.
"""

from __future__ import annotations

import io
from typing import Any

import torch

__all__ = ["scheduler_state", "restorable", "storable"]


def restorable(scheduler: Any) -> bool:
    """Whether ``scheduler`` hands out and takes back its state (``state_dict`` and
    ``load_state_dict``, as torch's schedulers do)."""
    return (callable(getattr(scheduler, "state_dict", None))
            and callable(getattr(scheduler, "load_state_dict", None)))


def scheduler_state(scheduler: Any, copy: Any) -> Any:
    """``copy(scheduler.state_dict())``, or ``None`` for no scheduler or one that keeps no
    state of its own to give (see :func:`restorable`)."""
    if scheduler is None or not restorable(scheduler):
        return None
    return copy(scheduler.state_dict())


def storable(state: Any) -> bool:
    """Whether ``state`` can be written with ``torch.save`` and read back with
    ``torch.load(weights_only=True)``, as snapshot files are (a small state: a scheduler's)."""
    buf = io.BytesIO()
    try:
        torch.save(state, buf)
        buf.seek(0)
        torch.load(buf, map_location="cpu", weights_only=True)
    except Exception:   # (pickling a lambda, an unsupported global on the way back, ...)
        return False
    return True
