"""How much host memory the run's state takes, and whether more copies of it fit.

lrwatch keeps CPU copies of the run's weights and optimizer state: the start check's (two or
three, for a few steps) and the rollback snapshots (``keep`` of them, unless they go to disk).
A large model's copies could take the host's memory from under the run, which the kernel then
kills; :func:`copies_fit` tells the caller beforehand, so it can skip the copy and say why.

The room is the smaller of the machine's available memory (``MemAvailable``) and what is left
under the process's cgroup memory limit (a container's limit, which ``/proc/meminfo`` does not
show), less the page cache the cgroup can reclaim.

Under ``torch.distributed`` the ranks must take the same decision (every rank holds the same
snapshots, and the start check's collectives need every rank), and the ranks of one machine
share its memory. Each rank describes itself in a :class:`MemoryReport`; the reports are
gathered (one collective the Watcher already makes) and :func:`reports_fit` decides on all of
them at once: the copies of all the ranks of a machine against the machine's room, and of all
the ranks of a cgroup against the cgroup's. Every rank computes the same answer.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["HOST_SHARE", "MemoryReport", "tensor_bytes", "state_bytes", "host_available_bytes",
           "cgroup_room_bytes", "local_report", "reports_fit", "copies_fit"]

#: The share of the available memory that new copies of the run may take.
HOST_SHARE = 0.5

# A cgroup v1 "no limit" is a page-rounded 2**63 - 1; anything past 2**60 bytes is no limit.
_NO_LIMIT = 2 ** 60


@dataclass(frozen=True)
class MemoryReport:
    """One rank's memory, as :func:`reports_fit` needs it (picklable, torch-free).

    ``machine`` identifies the kernel (containers on one machine share it), ``cgroup`` the
    memory cgroup on it; ``need`` is the bytes of one copy of this rank's weights and optimizer
    state; ``machine_free`` and ``cgroup_free`` the room there (``None``: unknown / no limit).
    """

    machine: str
    cgroup: str
    need: int
    machine_free: int | None
    cgroup_free: int | None


def _local_bytes(t: torch.Tensor) -> int:
    local = getattr(t, "_local_tensor", None)   # a DTensor holds its shard, not the whole
    if isinstance(local, torch.Tensor):
        t = local
    return t.numel() * t.element_size()


def tensor_bytes(obj: Any) -> int:
    """The bytes this process holds of every tensor in ``obj`` (dicts, lists and tuples
    recursively; a DTensor counts its local shard)."""
    if isinstance(obj, torch.Tensor):
        return _local_bytes(obj)
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo_available() -> int | None:
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                break
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _stat_value(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _cgroup_files() -> tuple[str | None, str | None, str | None]:
    """(limit, usage, stat) of this process's memory cgroup, v2 or v1; ``None`` where absent."""
    v2 = "/sys/fs/cgroup"
    limit = _read(f"{v2}/memory.max")
    if limit is not None:
        return limit, _read(f"{v2}/memory.current"), _read(f"{v2}/memory.stat")
    v1 = "/sys/fs/cgroup/memory"
    return (_read(f"{v1}/memory.limit_in_bytes"), _read(f"{v1}/memory.usage_in_bytes"),
            _read(f"{v1}/memory.stat"))


def cgroup_room_bytes() -> int | None:
    """What is left under this process's cgroup memory limit, counting the inactive page cache
    the cgroup can reclaim as free; ``None`` when there is no limit or it cannot be read."""
    limit_s, usage_s, stat = _cgroup_files()
    try:
        limit = int((limit_s or "").strip())
        usage = int((usage_s or "").strip())
    except ValueError:   # "max" (no v2 limit), absent, unreadable
        return None
    if limit >= _NO_LIMIT:
        return None
    cache = (_stat_value(stat, "inactive_file") or _stat_value(stat, "total_inactive_file"))
    return max(0, limit - max(0, usage - cache))


def host_available_bytes() -> int | None:
    """The memory this process can still take: the smaller of the machine's available memory
    and its cgroup's room (:func:`cgroup_room_bytes`); ``None`` where neither can be read."""
    known = [v for v in (_meminfo_available(), cgroup_room_bytes()) if v is not None]
    return min(known) if known else None


def _machine_id() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id")
    return boot.strip() if boot and boot.strip() else socket.gethostname()


def _cgroup_id() -> str:
    # The cgroup filesystem's inode is the cgroup's own (a cgroup namespace shows "/" inside
    # every container, so the path in /proc/self/cgroup would not tell two containers apart).
    for path in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        try:
            st = os.stat(path)
        except OSError:
            continue
        return f"{st.st_dev}:{st.st_ino}"
    return ""


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of one copy of the run's weights and optimizer state. Before the first step an
    optimizer's state is still empty: it is counted as two tensors per parameter (Adam's; SGD
    and RMSprop keep at most that). Read off the parameters and buffers, not ``state_dict()``,
    which some wrappers gather across ranks."""
    params = tensor_bytes([p for g in optimizer.param_groups for p in g["params"]])
    opt = max(tensor_bytes(list(optimizer.state.values())), 2 * params)
    return tensor_bytes(list(model.parameters()) + list(model.buffers())) + opt


def local_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> MemoryReport:
    """This process's :class:`MemoryReport` for the run's state."""
    return MemoryReport(machine=_machine_id(), cgroup=_cgroup_id(),
                        need=state_bytes(model, optimizer),
                        machine_free=_meminfo_available(), cgroup_free=cgroup_room_bytes())


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def reports_fit(reports: Sequence[MemoryReport], copies: int) -> tuple[bool, str]:
    """Whether ``copies`` more copies of every reporting rank's state fit in
    :data:`HOST_SHARE` of the room of each machine and each cgroup the ranks share (unknown
    room: assumed to fit), and the numbers when they do not. Pure: every rank that holds the
    same reports gets the same answer."""
    groups: dict[tuple[str, ...], list[MemoryReport]] = {}
    for r in reports:
        groups.setdefault(("machine", r.machine), []).append(r)
        groups.setdefault(("cgroup", r.machine, r.cgroup), []).append(r)
    what = "copy" if copies == 1 else "copies"
    for key, members in groups.items():
        free = [m.machine_free if key[0] == "machine" else m.cgroup_free for m in members]
        known = [f for f in free if f is not None]
        if not known:
            continue
        need, room = copies * sum(m.need for m in members), min(known)
        if need <= HOST_SHARE * room:
            continue
        whose = ("the run's weights and optimizer state" if len(members) == 1 else
                 f"the weights and optimizer state of the {len(members)} ranks sharing it")
        where = ("host memory available" if key[0] == "machine" else
                 "room under the cgroup's memory limit")
        return False, (f"{copies} {what} of {whose}, {_gib(need)}, need more than "
                       f"{HOST_SHARE:.0%} of the {_gib(room)} of {where}")
    return True, ""


def copies_fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, copies: int,
               reports: Sequence[MemoryReport] | None = None) -> tuple[bool, str]:
    """Whether ``copies`` CPU copies of the run's weights and optimizer state fit
    (:func:`reports_fit`), and the numbers when they do not: of this process alone, or of every
    rank when ``reports`` holds the ranks' gathered :class:`MemoryReport`\\ s."""
    if reports is None:
        host = host_available_bytes()
        reports = [MemoryReport("", "", state_bytes(model, optimizer), host, None)]
    return reports_fit(reports, copies)
