"""On a CUDA device the Watcher's step path never makes the host wait for the GPU.

Runs only where CUDA is available (CI has none; ``benchmarks/gpu_check.sh`` runs it on a GPU
machine). Every configuration trains under ``torch.cuda.set_sync_debug_mode("error")``, where any
synchronising call raises; the Watcher fails open, so a sync inside it shows up as an internal
error rather than a crash, and both are checked. ``flush_every`` is longer than the run (the
flush, the one intended transfer, happens at ``close()``, after the mode is reset); rollback
snapshots are due every 10 steps (fewer are taken while two are still pending).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrwatch.watch import Watcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 60
CONFIGS = {
    "defaults": ({}, {}),
    "fused AdamW (guard on)": ({}, {"fused": True}),
    "guard=on": ({"recovery": {"guard": "on", "min_interval": 10}}, {}),
    "all-on": ({"per_layer": True, "update_ratio": True, "update_ratio_every": 1}, {}),
    "fp16 GradScaler, fused AdamW": ({}, {"amp": True, "fused": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_watcher_step_path_has_no_host_sync(name):
    kw, opts = CONFIGS[name]
    kw = {"recovery": {"min_interval": 10}, **kw}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.LayerNorm(256),
                          nn.Linear(256, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=bool(opts.get("fused")))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    scaler = torch.amp.GradScaler("cuda") if opts.get("amp") else None
    watch = Watcher(model, opt, sched, scaler=scaler, flush_every=STEPS + 10, **kw)
    xs = [torch.randn(64, 32, device="cuda") for _ in range(4)]
    ys = [torch.randint(0, 10, (64,), device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(STEPS):
            with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
                loss = nn.functional.cross_entropy(model(xs[i % 4]), ys[i % 4])
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:  # a fused optimizer takes the scale and the inf flag on the device: no sync
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sched.step()
            watch.log(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.close()
    assert watch.registry.get_sample_value("lrwatch_internal_errors_total") == 0
    store = watch.store
    # the first snapshot is taken when the Watcher is built (outside the debug mode); at least
    # one more was taken on the step path, inside it
    assert store is not None and store.taken >= 2 and store.failed == 0


def _lagged_run(flush_lag, debug_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    got = []
    watch = Watcher(model, opt, flush_every=5, flush_lag=flush_lag, listeners=[got.append],
                    recovery={"min_interval": 10})
    xs = [torch.randn(64, 32, device="cuda") for _ in range(4)]
    ys = [torch.randint(0, 10, (64,), device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(debug_mode)
    try:
        for i in range(STEPS):
            loss = nn.functional.cross_entropy(model(xs[i % 4]), ys[i % 4])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            watch.log(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.close()
    return watch, got


def test_a_lagged_flush_waits_on_an_event_and_reads_the_same_values():
    """The default on CUDA (``flush_lag=1``): every flush's copy goes to pinned memory without a
    synchronising call (none raises under "error" mode, with a flush every 5 steps), and the
    values read one step later are exactly those a direct flush reads."""
    lagged, got = _lagged_run(None, "error")
    assert lagged.flush_lag == 1 and lagged.flushes == STEPS // 5
    assert lagged.registry.get_sample_value("lrwatch_internal_errors_total") == 0
    _, ref = _lagged_run(0, "default")
    keys = ("loss", "grad_norm", "lr")
    assert [s.step for s in got] == [s.step for s in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        assert {k: a.values[k] for k in keys} == {k: b.values[k] for k in keys}
