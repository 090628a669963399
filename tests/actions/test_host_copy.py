"""HostCopy (snapshots' host copies) and the GradScaler state a snapshot keeps."""

from __future__ import annotations

import pytest
import torch

from lrwatch.actions.host_copy import HostCopy
from lrwatch.actions.snapshot import SnapshotStore, _live_state, capture_state, restore_state


def test_copy_is_a_deep_host_copy_of_nested_state():
    a = torch.arange(6.0).reshape(2, 3)
    state = {"w": a, "nested": [a.t(), (torch.tensor(3), 7)], "name": "x"}
    hc = HostCopy()
    out = hc.copy(state)
    hc.wait()
    a.add_(100)  # the original changes after the copy: the copy must not
    assert torch.equal(out["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(out["nested"][0], torch.arange(6.0).reshape(2, 3).t())
    assert out["nested"][1][1] == 7 and out["name"] == "x"
    assert isinstance(out["nested"], list) and isinstance(out["nested"][1], tuple)
    assert out["w"].data_ptr() != a.data_ptr()


def test_on_cpu_nothing_is_pending():
    hc = HostCopy(asynchronous=True)
    hc.copy({"t": torch.ones(3)})
    assert not hc.pending and hc.copied_sync == 1 and hc.copied_async == 0
    assert hc.finish() is hc and not hc.pending


def _scaler_run(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer, p: torch.Tensor,
                value: float) -> None:
    opt.zero_grad()
    scaler.scale((p * value).sum()).backward()
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_state_round_trips_through_tensors():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    model = torch.nn.Linear(1, 1)
    _scaler_run(scaler, opt, p, 1.0)
    before = scaler.state_dict()
    state = capture_state(model, opt, None, scaler)
    assert isinstance(state["scaler"]["scale"], torch.Tensor)   # no host read at capture
    _scaler_run(scaler, opt, p, float("inf"))                    # overflow: the scale backs off
    assert scaler.state_dict()["scale"] != before["scale"]
    restore_state(state, model, opt, None, scaler)
    assert scaler.state_dict() == before


def test_unused_scaler_gives_its_own_state_dict():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = capture_state(model, opt, None, scaler)
    assert state["scaler"] == scaler.state_dict()
    restore_state(state, model, opt, None, scaler)
    assert scaler.get_scale() == 8.0


def test_snapshot_on_disk_and_in_memory_load_the_same(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    mem = SnapshotStore().take(5, 5, model, opt)
    disk = SnapshotStore(directory=tmp_path).take(5, 5, model, opt)
    assert mem is not None and disk is not None and mem.copies is None
    a, b = mem.load(), disk.load()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])


def test_bulk_copy_without_pinned_memory_falls_back_to_plain_copies(caplog):
    # what a machine that cannot pin memory gets (here: no CUDA at all, forced into the path)
    if torch.cuda.is_available():
        pytest.skip("pinned memory is available here")
    hc = HostCopy()
    hc.asynchronous = True
    ts = [torch.arange(4.0), torch.ones(2, 3).t(), torch.tensor(5, dtype=torch.int64)]
    out = hc._bulk(ts)
    assert not hc.asynchronous and hc.copied_sync == 3 and hc.copied_async == 0
    assert "cannot pin host memory" in caplog.text
    for a, b in zip(out, ts):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_foreach_copy_matches_copy_one_by_one():
    from lrwatch.actions.host_copy import _foreach_copy

    srcs = [torch.randn(3, 4), torch.randn(5).to(torch.float64), torch.randn(2, 2).t()]
    dsts = [torch.empty(t.shape, dtype=t.dtype) for t in srcs]
    _foreach_copy(dsts, srcs)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_copies_make_no_host_sync_and_land_intact():
    x = torch.randn(1 << 20, device="cuda")
    expect = x.cpu()
    torch.cuda.synchronize()
    hc = HostCopy()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = hc.copy({"x": x, "s": x[::2]})   # a strided view too
        hc.finish()
        x.mul_(0)                                # queued after the copy: must not leak in
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hc.pending and hc.copied_async == 2
    hc.wait()
    assert not hc.pending
    assert out["x"].is_pinned() and torch.equal(out["x"], expect)
    assert torch.equal(out["s"], expect[::2])


@cuda
def test_cuda_snapshot_store_takes_without_sync_and_restores():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(32, 64, device="cuda")

    def step() -> None:
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()

    step()
    want = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.cuda.synchronize()
    store = SnapshotStore()
    torch.cuda.set_sync_debug_mode("error")
    try:
        snap = store.take(1, 1, model, opt, None, scaler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert snap is not None and store.failed == 0
    for _ in range(3):
        step()
    restore_state(snap.load(), model, opt, None, scaler)
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), want[k])


@cuda
def test_cuda_bulk_copy_of_mixed_state_one_buffer_per_dtype():
    w = torch.randn(64, 32, device="cuda")
    state = {"w": w, "wt": w.t(), "h": torch.randn(7, device="cuda", dtype=torch.float16),
             "step": torch.tensor(3.0),                       # a CPU tensor among them
             "n": torch.tensor(11, device="cuda"),            # 0-d int64
             "empty": torch.empty(0, device="cuda"),
             "groups": [{"b": torch.randn(5, device="cuda")}]}
    expect = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    b_expect = state["groups"][0]["b"].cpu()
    torch.cuda.synchronize()
    hc = HostCopy()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = hc.copy(state)
        hc.finish()
        w.zero_()                                # after the copy is queued: must not leak in
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hc.wait()
    assert hc.copied_async == 6 and hc.copied_sync == 1
    for k in ("w", "wt", "h", "n", "empty", "step"):
        assert out[k].device.type == "cpu" and torch.equal(out[k], expect[k]), k
        assert out[k].dtype == expect[k].dtype and out[k].shape == expect[k].shape
    assert torch.equal(out["groups"][0]["b"], b_expect)
    # the float32 copies share one pinned buffer
    assert out["w"].is_pinned() and (out["w"].untyped_storage().data_ptr()
                                     == out["groups"][0]["b"].untyped_storage().data_ptr())


def _states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict):
        return set(a) == set(b) and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_capture_and_restore_queue_their_copies_without_a_host_sync(fused):
    """The start check's captures and every restore (a rollback, the shadow's way back): no
    synchronising call per tensor under "error" mode, and the state comes back bit for bit
    (parameters and buffers in place, optimizer state where load_state_dict puts it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(16, 32, device="cuda")

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    params = [p.data_ptr() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = capture_state(model, opt, sched)
        for _ in range(3):
            step()                       # queued after the copies: must not leak into them
        restore_state(state, model, opt, sched)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    want = {"model": state["model"], "optimizer": state["optimizer"]}
    got = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    assert _states_equal(want, got)
    assert [p.data_ptr() for p in model.parameters()] == params      # restored in place
    for group_state in opt.state.values():
        assert group_state["exp_avg"].is_cuda
        assert group_state["step"].is_cuda == fused                   # as load_state_dict puts it
    assert sched.last_epoch == 2
    step()                                                            # and it trains on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _bf16_on_save(module, state, prefix, local_metadata):   # a state_dict hook: saves bf16
    for key in [k for k in state if k.startswith(prefix)]:
        state[key] = state[key].to(torch.bfloat16)


def test_the_in_place_restore_is_only_for_a_state_dict_of_the_live_tensors():
    """A restore on a GPU copies the snapshot into the tensors ``state_dict(keep_vars=True)``
    hands out; a state_dict hook (or override) hands out converted copies, which that copy
    filled while the model kept its diverged weights (``load_state_dict`` restores them)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 4))
    model[2].weight = model[0].weight                     # tied: one tensor, two keys
    live = _live_state(model)
    assert live is not None and live["2.weight"] is model[0].weight
    model[0].register_state_dict_post_hook(_bf16_on_save)
    assert _live_state(model) is None
    assert _live_state(torch.nn.Sequential()) == {}


@cuda
def test_cuda_restore_of_a_model_with_a_state_dict_hook_restores_the_model():
    model = torch.nn.Linear(8, 8).cuda()
    model.register_state_dict_post_hook(_bf16_on_save)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = SnapshotStore(keep=2)
    snap = store.take(0, 0, model, opt)
    assert snap is not None
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    restore_state(snap.load(), model, opt)
    torch.cuda.synchronize()
    assert torch.isfinite(model.weight).all()
