"""The `lrwatch lr-find` target file the CLI tests write and point at (``file.py:make``)."""

TARGET = '''
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

@dataclass
class Spec:   # a dataclass under postponed annotations needs its module in sys.modules
    lr: float = 0.05

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=Spec().lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)
    return {"model": model, "optimizer": opt, "loader": loader,
            "loss_fn": nn.functional.cross_entropy}

def broken():
    return {"model": nn.Linear(2, 2)}

def nan_loss():
    d = make()
    d["loss_fn"] = lambda out, y: nn.functional.cross_entropy(out, y) * float("nan")
    return d

def warm_up():   # a LambdaLR warm-up from 0: the optimizer's rate is 0 at the start
    d = make()
    d["scheduler"] = torch.optim.lr_scheduler.LambdaLR(d["optimizer"], lambda s: s / 10)
    return d

def wrong_loss():   # the loss raises: one target for a batch of outputs
    d = make()
    d["loss_fn"] = lambda out, y: nn.functional.cross_entropy(out, y[:1])
    return d

def frozen_first():   # group 0 frozen by its rate 0; group 1 at 0.05
    d = make()
    model = d["model"]
    d["optimizer"] = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                                      {"params": model[2].parameters(), "lr": 0.05}])
    return d

def make_batch_loss():
    d = make()
    fn = d.pop("loss_fn")
    d["batch_loss"] = lambda m, b: fn(m(b[0]), b[1])
    return d
'''
