"""Framework-free parts of the integrations: the skip sampler, export options, importability."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.integrations._common import (SkipSampler, check_export, eval_name, export_kwargs,
                                          wrap_dataloader)


def test_watcher_skip_batch_counts_and_consumes_the_window() -> None:
    model = torch.nn.Linear(2, 1)
    w = lrwatch.Watcher(model, torch.optim.SGD(model.parameters(), lr=0.1), rules=None)
    w.load_state_dict({**w.state_dict(), "skip_remaining": 2})
    assert [w.skip_batch() for _ in range(4)] == [True, True, False, False]
    assert w.skipped_batches == 2 and w.data_position == 4
    w.close()


def test_wrapped_dataloader_drops_whole_batches_on_request() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(40))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)
    drop = {2, 3}
    calls = iter(range(100))
    assert wrap_dataloader(dl, lambda: next(calls) in drop)
    assert isinstance(dl.batch_sampler.sampler, SkipSampler) and len(dl) == 10
    firsts = [int(b[0][0]) for b in dl]
    assert firsts == [0, 4, 16, 20, 24, 28, 32, 36]
    ds_iter = torch.utils.data.DataLoader(_Stream(), batch_size=None)
    assert not wrap_dataloader(ds_iter, lambda: False)


def test_a_resumed_skip_sampler_replays_its_pass_without_counting_it_again() -> None:
    """The pass a checkpoint describes (``pass_state``: batches 0-4 drawn, 2 and 3 dropped)
    is replayed by the resumed sampler: the same batches dropped and yielded, ``take()``
    not asked for them (the checkpoint's ``data_position`` and skip window have them), then
    the pass goes on as it would have. ``hide`` passes by that many more of its first
    batches, ``pad`` puts a pass of copies of a first batch before it (for a framework whose
    fast-forward falls short of, or goes past, where the checkpoint was)."""
    ds = torch.utils.data.TensorDataset(torch.arange(40))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)
    calls = iter(range(100))
    assert wrap_dataloader(dl, lambda: next(calls) in {2, 3})
    sampler = dl.batch_sampler.sampler
    it = iter(dl)
    assert [int(next(it)[0][0]) for _ in range(3)] == [0, 4, 16]
    state = sampler.pass_state()
    assert state == {"yielded": 3, "drops": [2, 2], "earlier": 0, "done": False}
    asked: list[int] = []
    for hide, pad, firsts in ((0, 0, [0, 4, 16, 20, 24]), (2, 0, [16, 20, 24]),
                              (0, 2, [0, 0])):
        other = torch.utils.data.DataLoader(ds, batch_size=4)
        assert wrap_dataloader(other, lambda: bool(asked.append(1)))
        other.batch_sampler.sampler.resume(state, hide=hide, pad=pad)
        got = [int(b[0][0]) for b in other]
        assert got[:len(firsts)] == firsts, (hide, pad, got)
        if pad:   # the pass after the copies is the checkpoint's, replayed
            assert [int(b[0][0]) for b in other][:3] == [0, 4, 16]
    assert len(asked) == 3 * 5   # each run's batches after the replayed ones (20-36)


def test_under_accelerate_batch_sampler_shard_every_rank_drops_the_same_own_batches() -> None:
    """accelerate's ``BatchSamplerShard`` (a ``BatchSampler`` subclass) deals the batches of the
    global batch sampler round-robin to the processes: the wrapper goes under it, and one skip
    drops one batch of *every* rank, so the ranks stay on their own shards."""
    shard_cls = pytest.importorskip("accelerate.data_loader").BatchSamplerShard
    ds = torch.utils.data.TensorDataset(torch.arange(48))
    firsts = []
    for rank in range(2):
        inner = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 4, False)
        dl = torch.utils.data.DataLoader(ds, batch_sampler=shard_cls(inner, 2, rank))
        calls = iter(range(100))
        assert wrap_dataloader(dl, lambda: next(calls) == 1)  # drop this rank's 2nd batch
        assert isinstance(inner.sampler, SkipSampler) and inner.sampler.group == 2
        firsts.append([int(b[0][0]) for b in dl])
    assert firsts == [[0, 16, 24, 32, 40], [4, 20, 28, 36, 44]]


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from range(3)


def test_export_is_rank_zero_by_default() -> None:
    kw = {"port": 9400, "trace": "run.jsonl", "alertmanager": "http://am", "flush_every": 5}
    assert export_kwargs(kw, 0, "rank0") == {**kw, "export": "rank0"}
    assert export_kwargs(kw, 1, "rank0") == {"flush_every": 5, "export": "rank0"}
    per = export_kwargs(kw, 2, "all")
    assert per["trace"] == "run.rank2.jsonl" and per["port"] == 9402
    with pytest.raises(ConfigError, match="rank0"):
        check_export("per_rank")


def test_eval_names() -> None:
    p = ("val_", "val/")
    assert eval_name("val_loss", p) == "eval_loss"
    assert eval_name("val/acc", p) == "eval_accuracy"
    assert eval_name("train_loss", p) is None
    assert eval_name("eval_runtime", ("eval_",)) is None


def test_lrwatch_imports_without_the_frameworks() -> None:
    code = ("import sys\n"
            "for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate'):\n"
            "    sys.modules[m] = None\n"
            "import lrwatch, lrwatch.integrations, lrwatch.watch\n"
            "try:\n"
            "    import lrwatch.integrations.lightning\n"
            "except ImportError as e:\n"
            "    assert 'lrwatch[lightning]' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('imported without lightning')\n"
            "try:\n"
            "    import lrwatch.integrations.transformers\n"
            "except ImportError as e:\n"
            "    assert 'lrwatch[transformers]' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('imported without transformers')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lrwatchs_own_passes_over_the_data_keep_every_random_generator() -> None:
    """The untrained loss reads a few batches before the run does; a collator or dataset that
    draws from Python's random, numpy's or torch's global generator (MLM masking, an
    augmentation) got other draws in the run afterwards."""
    import random

    import numpy as np

    from lrwatch.integrations._common import rng_kept

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with rng_kept():
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_a_misspelt_lr_find_argument_is_refused_when_the_callback_is_built(framework: str) -> None:
    """The fourteenth round's audit: ``LrwatchCallback(lr_find={"num_step": 50})`` was accepted
    and failed only once the fit had started (a TypeError out of ``lr_find``, after the
    trainer's set-up). It is refused at once, with the valid names, which are exactly the
    arguments of ``lrwatch.lr_find`` that the callback does not pass itself."""
    import importlib
    import inspect

    from lrwatch.integrations._common import LR_FIND_KEYS

    callback = importlib.import_module(f"lrwatch.integrations.{framework}").LrwatchCallback
    with pytest.raises(ConfigError, match=r"unknown lr_find argument\(s\) \['num_step'\]; "
                                          r"valid: min_lr, max_lr, num_steps"):
        callback(lr_find={"num_step": 50})
    assert callback(lr_find={"num_steps": 50, "fraction": 0.2}).lr_find["num_steps"] == 50
    passed = {"model", "optimizer", "loader", "loss_fn", "batch_loss", "scheduler", "scaler"}
    assert LR_FIND_KEYS == tuple(p for p in inspect.signature(lrwatch.lr_find).parameters
                                 if p not in passed)


def test_a_refilled_pass_keeps_its_full_length_and_moves_no_order_it_does_not_need() -> None:
    """``refill`` (the Hugging Face callback's): a pass that dropped a batch is topped up
    with the first batch of the next epoch's order, its own short last batch kept last (not
    merged with a refill batch), so it yields as many batches as the framework planned
    (10 samples, 4 a batch: 4, 4, 2). A pass that dropped nothing draws no next order: a
    sampler without ``set_epoch`` (a random one on a generator) gives the run the orders it
    gives without lrwatch."""
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    inner = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=3)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=inner)
    calls = iter(range(100))
    assert wrap_dataloader(dl, lambda: next(calls) == 0, refill=True)
    dl.batch_sampler.sampler.set_epoch(0)
    own = list(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=3))
    ahead = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=3)
    ahead.set_epoch(1)
    following = list(ahead)
    got = [b[0].tolist() for b in dl]
    assert got == [own[4:8], following[:4], own[8:]], got
    g, h = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=g)
    wrapped = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=h)
    assert wrap_dataloader(wrapped, lambda: False, refill=True)
    for _ in range(3):
        assert [b[0].tolist() for b in wrapped] == [b[0].tolist() for b in plain]


def test_a_refill_from_a_sampler_without_set_epoch_keeps_the_order_it_drew_for_the_next_pass(
        ) -> None:
    """Seventeenth round: a sampler whose order is not a function of ``set_epoch`` (a random
    one on a generator draws a new order at each pass). The refill drew the next order early
    to top up a pass that dropped a batch, and the next pass drew another: the batches topped
    up with came from an order never trained, and every later epoch was one draw further on
    than the run without the skip. The order drawn early is the next pass's now: that pass
    trains it (the refill batch again at its place), and the pass after it trains the order
    the run without lrwatch trains third."""
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    ref = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(7))
    orders = [list(ref) for _ in range(3)]
    dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=torch.utils.data.RandomSampler(
        ds, generator=torch.Generator().manual_seed(7)))
    calls = iter(range(100))
    assert wrap_dataloader(dl, lambda: next(calls) == 0, refill=True)
    passes = [[b[0].tolist() for b in dl] for _ in range(3)]
    first, second, third = orders
    assert passes[0] == [first[4:8], second[:4], first[8:]], passes[0]
    assert passes[1] == [second[:4], second[4:8], second[8:]], passes[1]
    assert passes[2] == [third[:4], third[4:8], third[8:]], passes[2]
