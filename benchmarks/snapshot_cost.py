"""What one in-memory rollback snapshot costs the host: the bulk copy against per-tensor copies.

A snapshot copies the model's and the optimizer's state to host memory. On a GPU the copies
themselves run on the copy engine; what the training loop pays is the host's work to queue them
(and, the first times, to pin the host memory they land in). :class:`lrwatch.actions.host_copy.
HostCopy` queues the CUDA tensors of one state dict as one pinned buffer per dtype and one
``torch._foreach_copy_``; before, it allocated and queued every tensor on its own. This script
times both, interleaved in one process (``SnapshotStore(keep=3).take`` after a few Adam steps,
``ROUNDS`` rounds of ``TAKES`` takes per arm, the arms alternating round by round), and
reports the median host time of a take per arm, the first takes (which pin new memory) apart
from the later ones (whose memory the caching host allocator reuses).

    python benchmarks/snapshot_cost.py --device cuda --models mlp-gpu,transformer-gpu
    python benchmarks/snapshot_cost.py --device cpu --models tiny --rounds 2   # harness only

On a CPU both arms copy synchronously, and the numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overhead import MODELS  # noqa: E402
from lrwatch.actions import host_copy  # noqa: E402
from lrwatch.actions.snapshot import SnapshotStore  # noqa: E402


def _per_tensor_copy(self: host_copy.HostCopy, obj: Any) -> Any:
    """The copy of lrwatch before the bulk copy: one pinned allocation and one queued copy per
    CUDA tensor (kept here as the reference arm)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if self.asynchronous and host_copy._bulk_kind(t):
            src = t if t.is_contiguous() else t.contiguous()
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            dst.copy_(src, non_blocking=True)
            self._devices.setdefault(src.device.index or 0, src.device)
            self.copied_async += 1
            return dst
        return self.tensor(t)
    if isinstance(obj, dict):
        return type(obj)((k, _per_tensor_copy(self, v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_per_tensor_copy(self, v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_per_tensor_copy(self, v) for v in obj)
    return obj


ARMS = {"bulk": host_copy.HostCopy.copy, "per-tensor": _per_tensor_copy}


def _setup(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    for x, y in spec.batches()[:3]:
        opt.zero_grad(set_to_none=True)
        spec.loss(model(x.to(device)), y.to(device)).backward()
        opt.step()
    return model, opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, device: torch.device, rounds: int, takes: int) -> dict[str, Any]:
    model, opt = _setup(name, device)
    tensors = len(model.state_dict()) + sum(
        sum(isinstance(v, torch.Tensor) for v in st.values()) for st in opt.state.values())
    out: dict[str, Any] = {"model": name, "tensors": tensors,
                           "bytes": sum(p.numel() * p.element_size()
                                        for p in model.parameters()) * 3}
    times: dict[str, dict[str, list[float]]] = {a: {"first": [], "later": []} for a in ARMS}
    for r in range(rounds):
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            host_copy.HostCopy.copy = ARMS[arm]            # type: ignore[method-assign]
            try:
                store = SnapshotStore(keep=3)
                for i in range(takes):
                    _sync(device)
                    t0 = time.perf_counter()
                    snap = store.take(i, i, model, opt)
                    dt = time.perf_counter() - t0
                    assert snap is not None, "snapshot failed"
                    times[arm]["first" if i < store.keep else "later"].append(dt)
                    snap.wait()
                del store, snap
            finally:
                host_copy.HostCopy.copy = ARMS["bulk"]     # type: ignore[method-assign]
    for arm, t in times.items():
        out[arm] = {k: {"median_ms": round(1e3 * statistics.median(v), 3), "n": len(v)}
                    for k, v in t.items() if v}
    later = [out[a].get("later", out[a]["first"])["median_ms"] for a in ("per-tensor", "bulk")]
    out["later_ratio_per_tensor_over_bulk"] = round(later[0] / later[1], 2) if later[1] else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="mlp-gpu,transformer-gpu")
    p.add_argument("--rounds", type=int, default=6, help="rounds per arm (alternating)")
    p.add_argument("--takes", type=int, default=8, help="snapshots per round (keep=3)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    res = []
    for name in a.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        print(f"{name}: measuring ...", file=sys.stderr, flush=True)
        r = measure(name, device, a.rounds, a.takes)
        res.append(r)
        print(json.dumps(r), flush=True)
    doc = {"benchmark": "snapshot_cost", "device": str(device), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "rounds": a.rounds, "takes": a.takes, "results": res}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
