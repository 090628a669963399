"""The export choices and the exporting arguments are defined once (``lrwatch.distributed``),
and the Watcher and the framework callbacks agree on them (issue 16)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lrwatch import distributed
from lrwatch.errors import ConfigError
from lrwatch.integrations import _common
from lrwatch.integrations._common import check_export, export_kwargs
from lrwatch.watch import Watcher


def test_the_callbacks_use_the_one_definition():
    assert _common.EXPORT_CHOICES is distributed.EXPORT_CHOICES
    assert not hasattr(_common, "_EXPORT_KEYS")


def test_every_exporting_key_is_a_watcher_argument():
    params = inspect.signature(Watcher).parameters
    assert [k for k in distributed.EXPORT_KEYS if k not in params] == []
    assert params["export"].default in distributed.EXPORT_CHOICES


def test_watcher_and_callbacks_accept_the_same_choices():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for choice in distributed.EXPORT_CHOICES:
        assert check_export(choice) == choice
        Watcher(model, opt, export=choice, rules=None, recovery=False).close()
    for bad in ("per_rank", "rank1", ""):
        with pytest.raises(ConfigError):
            check_export(bad)
        with pytest.raises(ConfigError):
            Watcher(model, opt, export=bad, rules=None, recovery=False)


def test_a_non_exporting_rank_drops_every_exporting_key_hook_included():
    kw = {k: object() for k in distributed.EXPORT_KEYS} | {"flush_every": 5}
    assert export_kwargs(kw, 1, "rank0") == {"flush_every": 5, "export": "rank0"}
    assert export_kwargs(kw, 0, "rank0") == {**kw, "export": "rank0"}
