"""Pipeline stages under one Watcher: which ranks hold the same parameters.

Under ``torch.distributed`` the Watcher reads a replicated gradient (DDP, a plain module) as
the same on every rank of its group: the ranks' norms are averaged (under FSDP2, rank 0's
replicated sum of squares is taken). A pipeline's stages hold different layers: one Watcher
over every stage's ranks (the one way their decisions agree, so that a rollback puts every
stage back to the same step) recorded the mean of the stages' norms for the whole model's
(0.88, the mean of 0.64 and 1.12, against 1.29), and the guard judged each stage's own. So each rank tells the others,
in the Watcher's first collective, what it holds (:func:`stage_peer`): the layout of its
parameters, and the size of the DDP group it is replicated over. A rank's gradients are then
held by :func:`replica_counts` ranks; where that is fewer than the group's ranks, each rank's
sum of squares, divided by that count, is added across the ranks (at the flush, and for the
guard in one all-reduce per step), as for sharded gradients.

A plain module's replicas are the ranks whose parameters have the same names, shapes and
dtypes: stages that happen to have the same layout (two halves of a stack of identical
blocks, each built as its own ``nn.Sequential``) read as replicas; their gradient norms
differ, which replicas' do not, and every rank warns once at the flush that shows it
(:func:`replicas_apart`). Wrap each stage in ``DistributedDataParallel`` over its stage's
ranks (a group of one rank works) to say so.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Sequence

import torch

__all__ = ["stage_peer", "replica_counts", "stages_of", "split_stages", "replicas_apart",
           "STAGES_PROBE_ERROR", "NOT_REPLICAS", "UNLOGGED_STAGE"]

#: Why a Watcher over pipeline stages refuses ``probe_loss``.
STAGES_PROBE_ERROR = (
    "lrwatch: the ranks of this process group hold different parameters (pipeline stages: "
    "{}), and probe_loss was given. The start check, the range tests and the untrained-loss "
    "measurement train or score the model alone on a batch with probe_loss(model, batch), "
    "which a pipeline stage cannot do without the other stages. Pass no probe_loss on any "
    "rank (and leave recovery lr_check and mid_check off): the rules, rollbacks, replays and "
    "the guard work over every stage without it")

#: Why a pipeline stage that completed a step without ``watch.log()`` stops (fails fast: the
#: other stages' next flush would wait for it until the collective timeout).
UNLOGGED_STAGE = (
    "lrwatch: this rank completed step {step} without calling watch.log(), and the ranks of "
    "the Watcher's group hold different parameters (pipeline stages: {stages}). Every stage "
    "calls watch.log() once per step, the stages without the loss with no values "
    "(watch.log()): a stage that never logs flushes a step later than the others, and their "
    "gathers then wait for each other until the collective timeout. Call watch.log() after "
    "each step on this stage too")


def stage_peer(model: torch.nn.Module) -> tuple[str, int | None]:
    """What this rank holds, for :func:`replica_counts`: a digest of its parameters' names,
    shapes and dtypes, and the size of the DDP group its module is replicated over (``None``
    for a module without a DDP wrapper)."""
    import torch.distributed as dist

    ddp = None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ddp = dist.get_world_size(model.process_group)
        model = model.module
    layout = repr([(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()])
    return hashlib.sha1(layout.encode()).hexdigest()[:16], ddp


def replica_counts(peers: Sequence[Any]) -> list[int]:
    """For each rank (``peers``: every rank's :func:`stage_peer`, in rank order), how many
    ranks hold the same replicated gradients: its DDP group's size where it has one, else
    the number of ranks whose parameters have its layout.

    >>> replica_counts([("a", None), ("a", None)])      # replicas (a module inside DDP)
    [2, 2]
    >>> replica_counts([("a", None), ("b", None)])      # two stages, one rank each
    [1, 1]
    >>> replica_counts([("a", 4)] * 4)                  # DDP over the world
    [4, 4, 4, 4]
    >>> replica_counts([("a", 2)] * 4)       # two stages alike, each DDP over its 2 ranks
    [2, 2, 2, 2]
    >>> replica_counts([("a", 2)] * 2 + [("b", 2)] * 2)
    [2, 2, 2, 2]
    """
    layouts = [p[0] for p in peers]
    return [p[1] if p[1] is not None else layouts.count(p[0]) for p in peers]


def stages_of(peers: Sequence[Any]) -> str:
    """The ranks grouped by what they hold, for messages: ``"ranks [0, 1] | ranks [2, 3]"``."""
    groups: dict[str, list[int]] = {}
    for r, p in enumerate(peers):
        groups.setdefault(p[0], []).append(r)
    return " | ".join(f"ranks {g}" for g in groups.values())


def split_stages(recorder: Any, dist: Any, probe_loss: Any) -> bool:
    """After the Watcher's first collective (``dist.peers`` filled): where this group's ranks
    hold different parameters, record this rank's gradients as its stage's part of the
    global norm (``StepRecorder.split_stages``), or refuse ``probe_loss`` (every rank alike:
    each reads the same peers and the same ``probe_loss`` setting, agreed). Returns whether
    they do."""
    if not dist.active or not dist.peers or any(p is None for p in dist.peers):
        return False
    counts = replica_counts(dist.peers)
    if min(counts) >= dist.world:
        return False
    if probe_loss is not None:
        from .errors import ConfigError
        raise ConfigError(STAGES_PROBE_ERROR.format(stages_of(dist.peers)))
    if recorder.split_stages(counts[dist.rank], dist.all_reduce_sum):
        warnings.warn("lrwatch: the ranks hold different parameters (pipeline stages: "
                      f"{stages_of(dist.peers)}): per-layer norms and the update ratio are "
                      "not yet combined across stages; they are off", stacklevel=3)
    return True


#: What the Watcher says once where ranks it reads as replicas record other gradient norms.
NOT_REPLICAS = (
    "lrwatch: rank {rank}'s gradient norm at step {step} is {theirs:.6g}, rank 0's {ours:.6g}: "
    "the Watcher reads the ranks' gradients as replicas (their parameters have the same "
    "layout and the module has no DDP wrapper), so the recorded norm is their mean and the "
    "guard judges each rank's own, where the ranks' gradients differ. Pipeline stages with "
    "the same layout: wrap each stage in DistributedDataParallel over its stage's ranks (a "
    "group of one rank works), so the norm is summed over the stages; data-parallel "
    "replicas: average the gradients over the ranks before optimizer.step()")


def replicas_apart(per_rank: Sequence[Sequence[Any]], rel: float = 1e-6
                   ) -> dict[str, Any] | None:
    """The first step whose ``grad_norm`` differs between rank 0 and another rank by more
    than ``rel`` (relative), as :data:`NOT_REPLICAS`'s fields, or ``None``. Replicas
    record the same norm (DDP hands every rank the same averaged gradients); ranks that
    differ are not replicas (pipeline stages read as such, gradients not averaged).

    >>> from lrwatch.samples import Sample
    >>> a = [Sample(step=1, values={"grad_norm": 1.0})]
    >>> replicas_apart([a, [Sample(step=1, values={"grad_norm": 1.0})]]) is None
    True
    >>> replicas_apart([a, [Sample(step=1, values={"grad_norm": 0.5})]])["rank"]
    1
    """
    for i, s0 in enumerate(per_rank[0]):
        ours = s0.values.get("grad_norm")
        if ours is None or not math.isfinite(ours):
            continue
        for r in range(1, len(per_rank)):
            row = per_rank[r][i] if i < len(per_rank[r]) else None
            theirs = None if row is None or row.step != s0.step else row.values.get("grad_norm")
            if theirs is not None and math.isfinite(theirs) and \
                    abs(theirs - ours) > rel * max(abs(ours), abs(theirs)):
                return {"rank": r, "step": s0.step, "ours": ours, "theirs": theirs}
    return None
