"""The rollback's range test under a real gloo group when one rank has no batch to test on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import distributed_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def test_a_rank_with_no_recent_batch_skips_the_range_test_with_every_rank(
        tmp_path: Path) -> None:
    # before the fix the rank with batches ran the range test alone: its steps' and loss's
    # collectives met the other rank's training (a gloo error or a 60 s timeout)
    spawn_ranks(dw.probe_with_no_batch_on_one_rank, args=(2, str(tmp_path / "store"),
                                                          str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first = results[0]
    probes = [e for e in first["events"] if e[0] == "probe"]
    assert probes and all(e[4] == 0 for e in probes), first["events"]   # the fixed factor
    assert first["probe_steps"] == 0
    for r in results:
        assert r["events"] == first["events"] and r["step"] == first["step"]
        assert r["weights"] == first["weights"] and r["lr"] == first["lr"]
