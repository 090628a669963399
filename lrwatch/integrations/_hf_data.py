"""The ``transformers`` callback's own draws of the training data (the untrained loss,
``lr_find``: the Trainer's dataloader is never iterated), the model's loss on a batch, and the
weights the Trainer loaded from its best checkpoint."""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch

from ..errors import ConfigError
from ._common import rng_kept

__all__ = ["_DatasetBatches", "_best_loaded", "_model_loss", "_sample_batches"]


class _DatasetBatches:
    """Batches of the training dataset, drawn with a private generator (``seed``) and collated
    by the dataloader's ``collate_fn``, on the model's device; iterating again gives the same
    batches. The Trainer's own dataloader is never iterated (accelerate's keeps state across
    passes) and no global random generator moves."""

    def __init__(self, dataset: Any, collate: Any, batch_size: int, device: Any,
                 seed: int = 0) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.device, self.seed = device, seed

    @classmethod
    def of(cls, loader: Any, batch_size: int, model: Any) -> _DatasetBatches | None:
        """``None`` for an iterable dataset or a loader without a dataset or ``collate_fn``."""
        ds = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if (batch_size < 1 or collate is None or ds is None
                or isinstance(ds, torch.utils.data.IterableDataset)
                or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__")
                or len(ds) < batch_size):
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return cls(ds, collate, batch_size, device)

    def __iter__(self) -> Any:
        n, bs = len(self.dataset), self.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for k in range(n // bs):
            batch = self.collate([self.dataset[i] for i in order[k * bs:(k + 1) * bs]])
            if isinstance(batch, Mapping):
                batch = {key: v.to(self.device, non_blocking=True)
                         if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            yield batch


def _sample_batches(loader: Any, n: int, batch_size: int, model: Any) -> list[Any]:
    """``n`` batches of the training data for the untrained loss (:class:`_DatasetBatches`,
    seed 0); empty for an iterable dataset or a loader without a dataset or ``collate_fn``."""
    batches = _DatasetBatches.of(loader, batch_size, model)
    if batches is None:
        return []
    with rng_kept():   # a collator that masks at random (MLM) draws from the global RNGs
        return list(itertools.islice(iter(batches), n))


def _best_loaded(args: Any, state: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """A host copy of the weights the Trainer loaded from its best checkpoint after the loop
    (``load_best_model_at_end``, as the Trainer decides it), or ``None`` when it loaded none."""
    if (model is None or not getattr(args, "load_best_model_at_end", False)
            or getattr(state, "best_model_checkpoint", None) is None):
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _model_loss(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a ``transformers`` model computes for ``batch`` (its ``labels`` included)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out:
        loss = out[0]   # return_dict=False: the loss leads the tuple
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError("the model returned no loss for a training batch; pass probe_loss= "
                          "to LrwatchCallback to probe the learning rate")
    return loss
