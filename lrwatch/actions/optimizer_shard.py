"""Optimizers whose state is sharded over the ranks: what a snapshot holds of them.

torch's ``ZeroRedundancyOptimizer`` keeps each parameter's state on one rank only (its local
optimizer, ``optimizer.optim``, steps that rank's shard). Its ``state_dict()`` refuses until
``consolidate_state_dict()`` has gathered every shard on one rank (a collective), so a
snapshot of it would fail on every rank. A snapshot holds this rank's shard instead: the local
optimizer's state dict, with the rates and settings of the wrapper's groups (a scheduler sets
those; the local optimizer sees them at the next ``step()``) and the layout it was taken on
(this rank, the world size, the shapes of the shard's parameters). It is restored on the same
rank of the same layout only: a snapshot of another layout (a run resumed on another world
size, or another partition) is refused with an error that says so, and a rollback to it fails
on every rank alike (``RankContext.all_or_none``).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["is_sharded", "shard_state", "shard_to_load", "SHARD_KEY"]

#: The key of a sharded optimizer's snapshot that holds the layout it was taken on.
SHARD_KEY = "lrwatch_shard"


def is_sharded(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ``ZeroRedundancyOptimizer`` (its state sharded over ranks)."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except Exception:  # pragma: no cover - torch without distributed
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _layout(optimizer: Any) -> dict[str, Any]:
    return {"rank": int(optimizer.rank), "world": int(optimizer.world_size),
            "shapes": [[list(p.shape) for p in g["params"]]
                       for g in optimizer.optim.param_groups]}


def shard_state(optimizer: Any) -> dict[str, Any]:
    """This rank's shard of a ``ZeroRedundancyOptimizer`` as a state dict of its local
    optimizer, its groups' settings the wrapper's (no collective), and its layout."""
    local = optimizer.optim.state_dict()
    groups = [{**{k: v for k, v in outer.items() if k != "params"}, "params": inner["params"]}
              for outer, inner in zip(optimizer.param_groups, local["param_groups"])]
    return {**local, "param_groups": groups, SHARD_KEY: _layout(optimizer)}


def shard_to_load(optimizer: Any, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (:func:`shard_state`) ready for the local optimizer's ``load_state_dict``;
    raises :class:`ValueError` naming the difference where it was taken on another layout
    (or is no shard: a state of the whole optimizer)."""
    was = saved.get(SHARD_KEY)
    now = _layout(optimizer)
    if was is None:
        raise ValueError(
            "lrwatch: this state holds no shard of a ZeroRedundancyOptimizer (it was taken of "
            "another optimizer), so it cannot be restored into this rank's shard")
    if (was["rank"], was["world"]) != (now["rank"], now["world"]):
        raise ValueError(
            f"lrwatch: this ZeroRedundancyOptimizer snapshot holds the shard of rank "
            f"{was['rank']} of {was['world']}, and this is rank {now['rank']} of "
            f"{now['world']}: a shard is restored only on the rank and world size it was taken "
            "on (resume on the same number of ranks, or from a checkpoint of the whole state: "
            "consolidate_state_dict() on every rank, then state_dict())")
    if was["shapes"] != now["shapes"]:
        raise ValueError(
            "lrwatch: this ZeroRedundancyOptimizer snapshot was taken on another partition of "
            f"the parameters (this rank's shard then {was['shapes']}, now {now['shapes']}): it "
            "cannot be restored into this shard")
    return {k: v for k, v in saved.items() if k != SHARD_KEY}
