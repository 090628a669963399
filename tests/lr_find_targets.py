"""The `lrwatch lr-find` target file the CLI tests write and point at (``file.py:make``)."""

TARGET = '''
import torch
from torch import nn

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)
    return {"model": model, "optimizer": opt, "loader": loader,
            "loss_fn": nn.functional.cross_entropy}

def broken():
    return {"model": nn.Linear(2, 2)}

def make_batch_loss():
    d = make()
    fn = d.pop("loss_fn")
    d["batch_loss"] = lambda m, b: fn(m(b[0]), b[1])
    return d
'''
