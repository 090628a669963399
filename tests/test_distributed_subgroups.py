"""Watchers on separate subgroups of one real gloo group: their exports must not collide."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import rank_trace_workers as rtw
from ranks import spawn_ranks
from lrwatch.trace import read_trace
from services import free_port

pytestmark = pytest.mark.slow


def _two_free_ports() -> int:
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


@pytest.mark.parametrize("export", ["rank0", "all"])
def test_watchers_on_separate_subgroups_get_their_own_port_and_trace(tmp_path: Path,
                                                                     export: str) -> None:
    # before the fix both subgroups' rank 0 wrote run.jsonl (run.rank0.jsonl with "all")
    # and served on the same port: the second server failed and the trace mixed both runs
    port = _two_free_ports()
    out = tmp_path / "traces"
    out.mkdir()
    spawn_ranks(rtw.subgroups, args=(2, str(tmp_path / "store"), str(out), export, port),
                nprocs=2)
    names = {"rank0": ["run.jsonl", "run.rank1.jsonl"],
             "all": ["run.rank0.jsonl", "run.rank1.jsonl"]}[export]
    assert sorted(p.name for p in out.glob("run*")) == names
    for rank, name in enumerate(names):
        samples = read_trace(out / name)
        assert [s.step for s in samples] == list(range(1, 7))
        assert {s.values["loss"] for s in samples} == {float(rank + 1)}   # its own run only
    urls = [json.loads((out / f"done{r}.json").read_text())["url"] for r in range(2)]
    assert urls == [f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port + 1}/metrics"]
