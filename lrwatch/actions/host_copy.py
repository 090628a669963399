"""Copies of training state in host memory that do not make the host wait for the GPU.

A plain ``tensor.to("cpu")`` of a CUDA tensor blocks the Python thread until the GPU has run
everything queued before it: on the step path that is a host-device sync, which stalls the
input pipeline and the kernel queue. :class:`HostCopy` instead copies each CUDA tensor into
page-locked ("pinned") host memory with ``non_blocking=True`` and records one CUDA event per
device after the last copy. The copies are ordered on the current stream, so they read the
values as of the moment they were queued, whatever runs after them; the host memory must not be
read before :meth:`HostCopy.wait` (which waits on the events; by then the copies have long
finished, since a snapshot is only read at a rollback or a disk write).

Tensors that are not on a CUDA device, not strided (sparse), or that cannot get pinned memory
are copied synchronously, as before; so are all tensors when ``asynchronous`` is false.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["HostCopy"]

log = logging.getLogger("lrwatch")


class HostCopy:
    """Collects host copies of tensors (see the module docstring).

    ``copy(obj)`` returns ``obj`` with every tensor replaced by a host copy (dicts, lists and
    tuples recursively; anything else is returned as is). ``wait()`` must run before the copies
    are read; it is cheap and idempotent.
    """

    def __init__(self, asynchronous: bool = True) -> None:
        self.asynchronous = bool(asynchronous) and torch.cuda.is_available()
        self._devices: dict[int, torch.device] = {}
        self._events: list[Any] = []
        self.copied_async = 0
        self.copied_sync = 0

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.asynchronous and t.device.type == "cuda" and t.layout == torch.strided:
            src = t if t.is_contiguous() else t.contiguous()
            try:
                dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            except RuntimeError as exc:  # no pinned memory to be had: copy as before
                log.warning("lrwatch: cannot pin host memory for a snapshot (%s); copying "
                            "synchronously from now on", exc)
                self.asynchronous = False
            else:
                dst.copy_(src, non_blocking=True)
                self._devices.setdefault(src.device.index or 0, src.device)
                self.copied_async += 1
                return dst
        self.copied_sync += 1
        return t.to("cpu", copy=True)

    def copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, dict):  # dict and OrderedDict (model state dicts)
            return type(obj)((k, self.copy(v)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self.copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.copy(v) for v in obj)
        return obj  # ints, floats, strings, None: immutable

    def finish(self) -> "HostCopy":
        """Mark the end of the copies: one event per device, on its current stream."""
        for device in self._devices.values():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)
        self._devices.clear()
        return self

    @property
    def pending(self) -> bool:
        """Whether copies may still be in flight (``wait`` has not run since they were queued)."""
        return bool(self._events or self._devices)

    def wait(self) -> None:
        """Block until every copy queued so far has landed in host memory."""
        if self._devices:
            self.finish()
        for event in self._events:
            event.synchronize()
        self._events.clear()
