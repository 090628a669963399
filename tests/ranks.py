"""Starts the ranks of a distributed test: ``spawn_ranks(fn, args, nprocs)`` is ``mp.spawn``
(the same ``fn(rank, *args)`` in ``nprocs`` fresh processes, joined, a rank's error raised here)
with processes forked from a fork server instead of started from scratch.

The fork server imports torch, lrwatch and the worker modules once per test session; each rank
is then a fork of that clean process (no process group, no test's state in it) and starts in a
fraction of a second instead of importing torch anew -- which, with two to four ranks per test,
was most of the distributed tests' time. What the ranks run, and the checks, are unchanged.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "lrwatch", "lrwatch.samples",
            "distributed_workers", "dist_audit14_workers", "rank_trace_workers", "actions.snapshot_audit12_workers",
            "dist_audit15_workers", "dist_audit16_workers", "dist_audit17_workers"]
multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...] = (), nprocs: int = 1) -> None:
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
