"""One fp16 training step under a ``GradScaler`` on the CPU, shared by the training-side
audits' tests that need steps the scaler skips."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fp16_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, x: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A cross-entropy step in fp16 autocast; the loss and whether the optimizer step was
    applied (the scaler did not lower its scale for an overflow)."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return loss, scaler.get_scale() >= before
