"""Distributed training: shard-correct norms and one agreed view of every flush.

Under ``torch.distributed`` each rank measures what it holds. Replicated gradients (DDP, or
``Replicate`` DTensor placements) are already the global ones; sharded gradients (FSDP2
``fully_shard``, ``Shard`` placements) only hold a slice, so their *sums of squares* are added
across ranks. Nothing is reduced per step or per parameter: at each flush every rank
contributes its rows once (one ``all_gather_object``), and every rank combines them the same way.
All ranks then hold identical samples, so their rules engines take identical decisions: if one
rank sees a NaN, every rank rolls back, to the same snapshot step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError
from .rank_settings import first_difference
from .samples import Sample

__all__ = ["RankContext", "RankFailed", "split_by_placement", "combine_rank_samples", "SQ_REP", "SQ_SHARD",
           "EXPORT_CHOICES", "EXPORT_KEYS", "JOIN_ERROR"]

#: Who exports (``/metrics``, trace, alerts, Pushgateway, hook) in a distributed run: the
#: Watcher's and the framework callbacks' ``export`` values.
EXPORT_CHOICES = ("rank0", "all")
#: The Watcher arguments that export; a rank that does not export runs without them.
EXPORT_KEYS = ("port", "trace", "pushgateway", "alerts", "alertmanager", "hook")

#: Row keys that carry partial sums of squares of a norm ``NAME``; combined at the flush.
SQ_REP = "_sq_rep/"
SQ_SHARD = "_sq_shard/"
#: Why lrwatch refuses ``Join`` (``torch.distributed.algorithms.join``) and what to do instead.
JOIN_ERROR = (
    "lrwatch: the {} is in torch.distributed's Join context (uneven inputs). lrwatch is not "
    "Joinable: a rank that has run out of batches shadows DDP's collectives, not lrwatch's "
    "gather at each flush, which would meet the wrong collective (a hang or an abort). Give "
    "every rank the same number of batches (DistributedSampler(drop_last=True), or stop "
    "every rank at the shortest shard's length), or use Join(..., "
    "throw_on_early_termination=True): it stops every rank at the same step when the first "
    "runs out of data (catch its RuntimeError, then call watch.close() on every rank).")
# Values that are the same on every rank: take rank 0's. Times: the slowest rank's.
_FROM_RANK0 = ("lr",)
_MAX_KEYS = ("step_time_seconds", "skipped", "snapshot_seconds")
_SUM_KEYS = ("samples_per_second",)


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


#: What a gather that failed says (a rank timed out waiting for the others, or one is gone).
GATHER_FAILED = (
    "lrwatch: rank {rank}'s gather with the other ranks of the Watcher's group failed ({why}): "
    "a rank was not in it -- it stopped (its own error says why), or it is at another point "
    "of the loop. Every rank of the group calls watch.log() once per step (pipeline stages "
    "without the loss too: watch.log() with no values), with the same flush_every, and is "
    "given the same number of batches")


class RankFailed(RuntimeError):
    """What another rank failed to do (:meth:`RankContext.all_or_none`), raised on this one so
    that every rank takes the same way on."""


class RankContext:
    """The process group lrwatch talks to, or an inactive context outside ``torch.distributed``."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        if self.rank < 0:   # torch's NON_GROUP_MEMBER: new_group() on a rank left out of it
            raise ConfigError(
                f"process_group: this process (global rank {dist.get_rank()}) is not a member "
                "of the group it was given, so it has no rank there to gather with. Build a "
                "Watcher only on the group's ranks, or pass the group this rank belongs to "
                "(each rank its own data-parallel group)")
        self.world = dist.get_world_size(group) if self.active else 1
        #: this process's rank in the default (world) group: distinct across subgroups
        self.global_rank = dist.get_rank() if self.active else 0
        self._dist = dist if self.active else None
        self._joinables: list[Any] = []   # see follow_join
        self._refused: list[Any] = []     # the Join configurations refused (once each)
        self.peers: list[Any] = []        # what each rank holds (agree_settings)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export_rank(self, export: str) -> int | None:
        """The rank that names what this rank exports (``port +`` it, the trace
        ``run.rank<it>.jsonl``, a ``rank`` label), or ``None`` for the plain names.

        With ``"all"``: the global rank. With ``"rank0"``: the global rank of a group's rank 0
        when that is not the world's rank 0, so that Watchers on separate subgroups (a
        pipeline's stages, each with its own data-parallel group) do not share a port and a
        trace; the world's rank 0 keeps the plain names.

        >>> RankContext().export_rank("all") is None   # outside torch.distributed
        True
        """
        if not self.active:
            return None
        if export == "all":
            return self.global_rank
        return self.global_rank if self.is_main and self.global_rank != 0 else None

    def follow_join(self, *objs: Any) -> None:
        """Refuse to gather while any of ``objs`` (the model, the optimizer) is in DDP's
        ``Join`` context (:meth:`gather`)."""
        self._joinables = [o for o in objs if hasattr(o, "_join_config")]
        self._refused = []

    @property
    def in_join(self) -> bool:
        """Whether the model or optimizer carries the mark of DDP's ``Join`` (inside one, or
        after one: the mark stays), where the ranks' data may run out at different steps (a
        rank out of data inside a ``Join`` must not start a collective of its own)."""
        return any(o._join_config.enable for o in self._joinables)

    def check_covers(self, model: Any, params: Sequence[Any]) -> None:
        """Raise :class:`~lrwatch.errors.ConfigError` where the ranks that train ``model``
        together (a ``DistributedDataParallel`` wrapper's group, the device mesh of sharded
        parameters) are not all in this group: those outside it would judge apart, and a
        rollback on one replica only leaves the replicas' weights apart, silently."""
        if self._dist is None or self.group is None:   # the world holds every rank
            return
        ours = set(self._dist.get_process_group_ranks(self.group))
        for what, ranks in _training_ranks(model, params):
            if not set(ranks) <= ours:
                raise ConfigError(
                    f"process_group: the model is trained by global ranks {sorted(ranks)} "
                    f"({what}), and the Watcher's group holds ranks {sorted(ours)} only: "
                    "the ranks outside it would take their own decisions (a rollback on one "
                    "replica leaves the replicas' weights apart). Pass the group the model is "
                    "trained over (for DDP: process_group=model.process_group), or one that "
                    "holds all its ranks")

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        """Add ``t`` across the group's ranks, in place (the sharded guard's one number per
        step; on a GPU enqueued like the wrapper's own collectives, no wait on the host)."""
        if self._dist is not None and self.world > 1:
            self._dist.all_reduce(t, group=self.group)

    def agree_settings(self, run_id: str, settings: dict[str, Any],
                       failed: BaseException | None = None, peer: Any = None) -> str:
        """Rank 0's ``run_id`` (one collective, the Watcher's first), having checked that
        every rank was built with the same ``settings`` (what paces the collectives: the
        flush interval and lag, the first step, the rules and their settings, the recovery
        settings: :func:`~lrwatch.wiring.pacing`). Raises
        :class:`~lrwatch.errors.ConfigError` on every rank alike where they differ: ranks
        that flush at different steps, or judge with different rules, pair one rank's gather
        with another's, and wait in the end until the collective timeout.

        ``failed``: why this rank could not build its Watcher (a rule file it cannot read);
        it raises that, the others a ``ConfigError`` naming it, so that no rank goes on to
        a collective the failed one will not be in.

        ``peer``: what this rank holds (:func:`~lrwatch.pipeline.stage_peer`); every rank's
        is left in :attr:`peers`, in rank order."""
        why = None if failed is None else f"{type(failed).__name__}: {failed}"
        got = self.gather((run_id, settings, why, peer))
        self.peers = [g[3] for g in got]
        if failed is not None:
            raise failed
        bad = next(((r, g[2]) for r, g in enumerate(got) if g[2] is not None), None)
        if bad is not None:
            raise ConfigError(
                f"lrwatch: rank {bad[0]} could not build its Watcher ({bad[1]}), so no rank "
                "builds one: their flushes and decisions are collectives, taken together. "
                f"Fix rank {bad[0]}'s settings (or what it reads: a rule file on each node)")
        for key, value in got[0][1].items():
            differ = {r: g[1].get(key) for r, g in enumerate(got) if g[1].get(key) != value}
            if differ:
                where, value, differ = first_difference(key, value, differ)
                raise ConfigError(
                    f"lrwatch: the ranks' Watchers were built with different {where}: rank 0 "
                    f"{value!r}, " + ", ".join(f"rank {r} {v!r}" for r, v in differ.items())
                    + f". Give every rank of the process group the same {key}: their flushes "
                    "and decisions are collectives, taken together")
        return str(got[0][0])

    def all_or_none(self, call: Callable[[], Any], what: str) -> Any:
        """``call()``, then under ``torch.distributed`` whether every rank's succeeded (one
        collective): where any rank raised, every rank raises, that one its own error, the
        others :class:`RankFailed` naming it. For what each rank does on its own before a
        step every rank must take alike (loading a rollback's snapshot: a rank that could
        not load it must not stop while the others roll back and train on)."""
        try:
            out, err = call(), None
        except Exception as exc:
            out, err = None, exc
        if self._dist is not None and self.world > 1:
            got = self.gather(None if err is None else f"{type(err).__name__}: {err}")
            failed = next(((r, e) for r, e in enumerate(got) if e is not None), None)
            if err is None and failed is not None:
                raise RankFailed(f"{what} failed on rank {failed[0]}: {failed[1]}")
        if err is not None:
            raise err
        return out

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order (one collective).

        Raises :class:`~lrwatch.errors.ConfigError` on every rank alike, before any rank
        has joined, inside a ``Join`` that shadows the others' collectives (see
        :data:`JOIN_ERROR`): there the gather would meet a joined rank's shadow collective.
        Once per ``Join``: ``Join`` leaves its mark on the module when it ends, and the error
        took every rank out of it, so ``close()`` gathers safely after it."""
        if self._dist is None or self.world == 1:
            return [payload]
        for obj in self._joinables:
            cfg = obj._join_config
            if (cfg.enable and not cfg.throw_on_early_termination
                    and all(cfg is not r for r in self._refused)):
                self._refused.append(cfg)
                raise ConfigError(JOIN_ERROR.format(type(obj).__name__))
        out: list[Any] = [None] * self.world
        try:
            self._dist.all_gather_object(out, payload, group=self.group)
        except RuntimeError as exc:   # gloo's timeout, a rank gone: say what to check
            raise RankFailed(GATHER_FAILED.format(rank=self.rank, why=exc)) from exc
        return out


def _training_ranks(model: Any, params: Sequence[Any]) -> list[tuple[str, list[int]]]:
    """The global ranks that train ``model`` together, with where that is read from: a DDP
    wrapper's process group, the device mesh of DTensor (FSDP2) parameters."""
    import torch.distributed as dist

    found: list[tuple[str, list[int]]] = []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        found.append(("its DistributedDataParallel process group",
                      dist.get_process_group_ranks(model.process_group)))
    dtensor = _dtensor_type()
    mesh = next((p.device_mesh for p in params if dtensor is not None
                 and isinstance(p, dtensor)), None)
    if mesh is not None:
        found.append(("the device mesh of its sharded parameters",
                      [int(r) for r in mesh.mesh.flatten().tolist()]))
    return found


def split_by_placement(grads: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                dict[int, list[torch.Tensor]]]:
    """Local tensors of replicated and of sharded gradients, for shard-correct norms: the
    replicated ones, and the sharded ones by the number of ranks that hold each shard.

    Plain tensors count as replicated (DDP all-reduces gradients, so every rank has the global
    ones). A DTensor is sharded if any of its placements shards it; the mesh dimensions it is
    not sharded on replicate its shard (HSDP: ``fully_shard`` over a 2-D mesh), so adding
    every rank's sum of squares counts each shard that many times: the sums are divided by
    it. Before 6 December (sixteenth round) they were not, and an HSDP run's norm read
    ``sqrt(replicas)`` times the true one.
    """
    dtensor = _dtensor_type()
    rep: list[torch.Tensor] = []
    shard: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            local = g.to_local()
            if any(p.is_shard() for p in g.placements):
                copies = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements)
                                   if not p.is_shard())
                shard.setdefault(copies, []).append(local)
            else:
                rep.append(local)
        else:
            rep.append(g)
    return rep, shard


def combine_rank_samples(per_rank: Sequence[Sequence[Sample]]) -> list[Sample]:
    """Merge the same steps measured on every rank into one global sample per step.

    - ``_sq_rep/NAME`` (rank 0's) and ``_sq_shard/NAME`` (summed over ranks) become
      ``NAME = sqrt(rep + shard)``; ``update_ratio`` is rebuilt from its two norms.
    - Learning rates and momenta come from rank 0; step times and skip flags are the maximum.
    - Everything else is the mean over the ranks that measured it, so a NaN on any rank
      propagates (and so does the rollback it triggers).

    >>> a = [Sample(step=1, values={"loss": 1.0, "_sq_shard/grad_norm": 9.0,
    ...                             "_sq_rep/grad_norm": 0.0})]
    >>> b = [Sample(step=1, values={"loss": 3.0, "_sq_shard/grad_norm": 16.0,
    ...                             "_sq_rep/grad_norm": 0.0})]
    >>> s = combine_rank_samples([a, b])[0]
    >>> s.values["loss"], s.values["grad_norm"]
    (2.0, 5.0)
    """
    if len(per_rank) == 1:
        return [_finish(s, dict(s.values)) for s in per_rank[0]]
    base = per_rank[0]
    out: list[Sample] = []
    for i, s0 in enumerate(base):
        rows = [r[i] for r in per_rank if i < len(r) and r[i].step == s0.step]
        values: dict[str, float] = {}
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r.values))
        for k in keys:
            vals = [r.values[k] for r in rows if k in r.values]
            if k.startswith(SQ_SHARD):
                values[k] = math.fsum(vals)
            elif k.startswith(SQ_REP) or k in _FROM_RANK0 or k.startswith("momentum/"):
                values[k] = s0.values.get(k, vals[0])
            elif k in _SUM_KEYS:
                values[k] = math.fsum(vals)
            elif k in _MAX_KEYS:
                values[k] = max(vals) if not any(math.isnan(v) for v in vals) else math.nan
            else:
                values[k] = math.fsum(vals) / len(vals)
        t = max((r.time for r in rows if r.time is not None), default=None)
        out.append(_finish(Sample(step=s0.step, time=t, values={}, lr_groups=s0.lr_groups),
                           values))
    return out


def _finish(s: Sample, values: dict[str, float]) -> Sample:
    names = {k[len(SQ_REP):] for k in values if k.startswith(SQ_REP)} | {
        k[len(SQ_SHARD):] for k in values if k.startswith(SQ_SHARD)}
    for name in names:
        sq = values.pop(SQ_REP + name, 0.0) + values.pop(SQ_SHARD + name, 0.0)
        values[name] = math.sqrt(sq) if sq >= 0 or math.isnan(sq) else math.nan
    if "_update_delta" in values and "_update_theta" in values:
        delta, theta = values.pop("_update_delta"), values.pop("_update_theta")
        values["update_ratio"] = delta / max(theta, 1e-12) if math.isfinite(theta) else math.nan
    for key in ("loss", "grad_norm"):
        if key in values:
            values[f"nonfinite_{'grad' if key == 'grad_norm' else 'loss'}"] = (
                0.0 if math.isfinite(values[key]) else 1.0)
    return Sample(step=s.step, time=s.time, values=values, lr_groups=s.lr_groups,
                  events=s.events)
