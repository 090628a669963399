"""The ``transformers`` callback's decisions on plain numbers (pure and torch-free): the
Trainer's factor for a loss over ``num_items_in_batch``, whether the model divides its loss
by it, and where the Trainer resumes in its data."""

from __future__ import annotations

__all__ = ["divides_by_items", "loss_world", "trainer_position"]


def loss_world(world_size: int | None, n_gpu: int | None, average_tokens: bool) -> int:
    """The Trainer's factor for a loss over ``num_items_in_batch``: under DDP with
    ``average_tokens_across_devices`` (the default) ``num_items_in_batch`` counts the tokens
    of *every* rank, so the model's loss is this rank's sum over the global count;
    ``compute_loss`` multiplies it by the number of processes (what DDP's gradient average
    undoes). lrwatch does the same, so the mean over ranks is the global per-token loss.
    1 without ``average_tokens`` or where one process drives several GPUs (``n_gpu > 1``)."""
    return int(world_size or 1) if average_tokens and int(n_gpu or 1) <= 1 else 1


def divides_by_items(ratio: float, n: int) -> bool:
    """Whether a model divides its loss by ``num_items_in_batch``, from ``ratio``, a
    micro-batch's mean loss over the untrained loss at a step of ``n`` micro-batches: about
    1/n where it does (each micro-batch's loss a share of the step's), about 1 where it
    returns each micro-batch's own mean; the boundary is their geometric middle."""
    return ratio < n ** -0.5


def trainer_position(batches: int, accumulation: int | None, step: int) -> tuple[int, int, int]:
    """Where the Trainer resumes at global step ``step`` over a dataloader of ``batches``
    batches: the epoch, the batches it fast-forwards into it
    (``Trainer._init_training_state``: the step // and % the optimizer steps of an epoch, the
    latter x the accumulation), and the accumulation (at least 1)."""
    acc = max(1, int(accumulation or 1))
    per_epoch = max(batches // acc + int(batches % acc > 0), 1)
    return step // per_epoch, step % per_epoch * acc, acc
