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

The CUDA tensors of one :meth:`HostCopy.copy` call (a model's or an optimizer's state dict:
hundreds of tensors for a transformer) go to one pinned buffer per dtype and device, in one
``torch._foreach_copy_``: one allocation and one call instead of hundreds of each, the Python
work a snapshot costs the host (the copies themselves run on the copy engine). The copies are
views into that buffer; a state dict built from them loads as any other.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["HostCopy", "memory_key"]

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
        """A synchronous host copy of one tensor (what is not bulk-copied)."""
        self.copied_sync += 1
        return t.detach().to("cpu", copy=True)

    def copy(self, obj: Any) -> Any:
        """``obj`` with its tensors copied (see the class docstring). Entries that are the
        same tensor (tied weights: a decoder sharing its embedding's matrix is two entries of
        one ``state_dict()``) get one copy between them, shared as in the original, so a
        snapshot holds them, and writes them to disk, once."""
        copies: dict[Any, torch.Tensor] = {}
        if self.asynchronous:
            found: dict[Any, torch.Tensor] = {}
            _gather(obj, found)
            copies = dict(zip(found, self._bulk(list(found.values())))) if found else {}
        return self._rebuild(obj, copies)

    def _rebuild(self, obj: Any, copies: dict[Any, torch.Tensor]) -> Any:
        """``obj`` with every tensor replaced by its copy in ``copies`` (by :func:`_key`: the
        bulk copies, and each one :meth:`tensor` made so far), made by :meth:`tensor` if none."""
        if isinstance(obj, torch.Tensor):
            key = _key(obj)
            if key not in copies:
                copies[key] = self.tensor(obj)
            return copies[key]
        if isinstance(obj, dict):  # dict and OrderedDict (model state dicts)
            return type(obj)((k, self._rebuild(v, copies)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self._rebuild(v, copies) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._rebuild(v, copies) for v in obj)
        return obj  # ints, floats, strings, None: immutable

    def _bulk(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of CUDA ``tensors``, in order: one pinned buffer per (dtype, device), one
        non-blocking foreach copy into views of it. Without pinned memory: one by one, as
        :meth:`tensor` does (which then copies synchronously)."""
        out: list[Any] = [None] * len(tensors)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(i)
        for (dtype, device), idx in groups.items():
            srcs = [tensors[i].detach() for i in idx]
            srcs = [t if t.is_contiguous() else t.contiguous() for t in srcs]
            sizes = [t.numel() for t in srcs]
            try:
                buf = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
            except RuntimeError as exc:  # no pinned memory to be had: copy as before
                log.warning("lrwatch: cannot pin host memory for a snapshot (%s); copying "
                            "synchronously from now on", exc)
                self.asynchronous = False
                for i in idx:
                    out[i] = self.tensor(tensors[i])
                continue
            dsts = [v.view(t.shape) for v, t in zip(torch.split(buf, sizes), srcs)]
            _foreach_copy(dsts, srcs)
            self._devices.setdefault(device.index or 0, device)
            self.copied_async += len(idx)
            for i, d in zip(idx, dsts):
                out[i] = d
        return out

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


def _bulk_kind(t: torch.Tensor) -> bool:
    """Whether ``t`` goes through the bulk copy: a strided CUDA tensor."""
    return t.device.type == "cuda" and t.layout == torch.strided


def memory_key(t: torch.Tensor) -> Any:
    """What makes two tensors the same values in the same memory (the same storage, offset,
    shape, strides and dtype: ``state_dict()`` hands a tied weight out as two detached views
    of one parameter), or ``None`` for one never shared (empty, not strided, no storage)."""
    if t.layout != torch.strided or not t.numel() or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):   # a tensor subclass without plain storage
        return None
    if not ptr:
        return None
    return (t.device, t.dtype, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            type(t))


def _key(t: torch.Tensor) -> Any:
    """:func:`memory_key`, or for a tensor never shared the object itself (the structure
    copied holds it while it is copied, so its ``id`` is its own)."""
    return memory_key(t) or ("object", id(t))


def _gather(obj: Any, found: dict[Any, torch.Tensor]) -> None:
    """The bulk-copied tensors of ``obj``, each once (by :func:`_key`)."""
    if isinstance(obj, torch.Tensor):
        key = _key(obj)
        if _bulk_kind(obj) and key not in found:
            found[key] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _gather(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _gather(v, found)


def _foreach_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src, non_blocking=True)`` for every pair, in one call where torch has it."""
    fn = getattr(torch, "_foreach_copy_", None)
    if fn is not None:
        try:
            fn(dsts, srcs, non_blocking=True)
            return
        except (RuntimeError, TypeError):  # an older signature: one by one below
            pass
    for d, s in zip(dsts, srcs):
        d.copy_(s, non_blocking=True)
