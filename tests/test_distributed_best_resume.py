"""Resuming the best evaluated state under a real gloo group: every rank its own file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import distributed_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def test_every_rank_resumes_its_own_best_state_from_rank_0s_checkpoint(tmp_path: Path) -> None:
    # before the fix the last rank read rank 0's best-eval.rank0.pt (the path in the
    # checkpoint) and restored rank 0's stage weights into its own stage
    spawn_ranks(dw.best_state_resume, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(results):
        assert r["step"] == 10, r
        assert r["where"] == f"best-eval.rank{rank}.pt"
        assert r["own"], f"rank {rank} restored another rank's state"
