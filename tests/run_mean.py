"""A layer with a buffer no state_dict holds, for the tests of buffers registered with
``persistent=False`` (tests/actions/test_training_audit16.py, in one process and, through
tests/dist_buffers16_workers.py, under DDP)."""

from __future__ import annotations

import torch
from torch import nn


class RunMean(nn.Module):
    """Centres its input; keeps a running mean of its training batches for evaluation in a
    buffer no state_dict holds (``persistent=False``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("avg", torch.zeros(n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(0.1 * x.mean(0))
            return x - x.mean(0)
        return x - self.avg
