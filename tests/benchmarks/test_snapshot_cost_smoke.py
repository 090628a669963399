"""The snapshot-cost harness (benchmarks/snapshot_cost.py) on a CPU: both arms run, the
reference arm is restored afterwards, and the report has its fields. (On a CPU both arms copy
synchronously; the numbers mean something only on a GPU.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import snapshot_cost  # noqa: E402
from lrwatch.actions.host_copy import HostCopy  # noqa: E402


def test_both_arms_run_and_the_bulk_copy_is_restored(tmp_path):
    out = tmp_path / "s.json"
    assert snapshot_cost.main(["--device", "cpu", "--models", "tiny", "--rounds", "2",
                               "--takes", "4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (r,) = doc["results"]
    assert r["model"] == "tiny" and r["tensors"] > 4
    for arm in ("bulk", "per-tensor"):
        assert r[arm]["first"]["n"] == 6 and r[arm]["later"]["n"] == 2
    assert HostCopy.copy is snapshot_cost.ARMS["bulk"]


def test_the_reference_arm_copies_as_the_bulk_one_does():
    state = {"w": torch.arange(6.0).reshape(2, 3), "g": [torch.ones(2).t(), 3]}
    a = HostCopy().copy(state)
    b = snapshot_cost._per_tensor_copy(HostCopy(), state)
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["g"][0], b["g"][0])
    assert a["g"][1] == b["g"][1] == 3
