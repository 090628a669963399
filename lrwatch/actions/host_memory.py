"""How much host memory the run's state takes, and whether more copies of it fit.

lrwatch keeps CPU copies of the run's weights and optimizer state: the start check's (two or
three, for a few steps) and the rollback snapshots (``keep`` of them, unless they go to disk).
A large model's copies could take the host's memory from under the run, which the kernel then
kills; :func:`copies_fit` tells the caller beforehand, so it can skip the copy and say why.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

__all__ = ["HOST_SHARE", "tensor_bytes", "host_available_bytes", "copies_fit"]

#: The share of the host's available memory that new copies of the run may take.
HOST_SHARE = 0.5


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj`` (dicts, lists and tuples recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def host_available_bytes() -> int | None:
    """The host memory available now (``MemAvailable`` of ``/proc/meminfo``, else free
    pages), or ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def copies_fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, copies: int
               ) -> tuple[bool, str]:
    """Whether ``copies`` CPU copies of the run's weights and optimizer state fit in
    :data:`HOST_SHARE` of the host's available memory (unknown: assumed to fit), and the
    numbers, for the log line when they do not. Before the first step an optimizer's state is
    still empty: it is counted as two tensors per parameter (Adam's; SGD and RMSprop keep at
    most that)."""
    params = tensor_bytes([p for g in optimizer.param_groups for p in g["params"]])
    opt = max(tensor_bytes(optimizer.state_dict()), 2 * params)
    need = copies * (tensor_bytes(model.state_dict()) + opt)
    avail = host_available_bytes()
    if avail is None or need <= HOST_SHARE * avail:
        return True, ""
    what = "copy" if copies == 1 else "copies"
    return False, (f"{copies} {what} of the run's weights and optimizer state, "
                   f"{need / 2 ** 30:.1f} GiB, need more than {HOST_SHARE:.0%} of the "
                   f"{avail / 2 ** 30:.1f} GiB of host memory available")
