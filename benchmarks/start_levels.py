"""What the Watcher's start levels cost: the untrained loss (8 forward passes) and the
constant-prediction loss (an L-BFGS fit of one output vector under the task's loss), against one
training step, on every task of the detection suite (``benchmarks/families.py``).

Measured side by side in one process, interleaved (untrained, constant, step; repeated), medians
reported, because the machines are noisy. One CPU thread, the suite's batch sizes. The step is
timed on a copy of the model, so the levels are those of the untrained model. The fit's cost
depends on the size of the model's output and the loss, not on the model: on these tiny models
it is several training steps, on a real one it is a fraction of one.

    python benchmarks/start_levels.py            # ~1 min
    python benchmarks/start_levels.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import families as fam  # noqa: E402
from benchmarks import family_runs as fr  # noqa: E402
from lrwatch.untrained import (UNTRAINED_BATCHES, OutputShapes,  # noqa: E402
                               measure_constant_loss, measure_untrained_loss)


def measure(task: str, repeats: int) -> dict[str, Any]:
    spec = fr.RunSpec(task=task, optimizer="adam", schedule="constant", lr_mult=1.0, seed=0)
    rec = fr._Recorder(spec)
    n, b = rec.data.n_train, rec.batch
    batches = [rec.data.batch(rec.perm[k * b:(k + 1) * b])
               for k in range(UNTRAINED_BATCHES) if (k + 1) * b <= n]

    def loss_of(m: torch.nn.Module, xy: Any) -> torch.Tensor:
        return rec.task.loss(m(xy[0]), xy[1])

    # the step is timed on a copy, so every measurement sees the untrained model
    twin = copy.deepcopy(rec.model)
    twin_opt = fam.make_optimizer(spec.optimizer, twin, rec.task.base_lr[spec.optimizer])
    times: dict[str, list[float]] = {"untrained": [], "constant": [], "step": []}
    levels: dict[str, float] = {}
    for _ in range(repeats):
        outputs = OutputShapes()
        t0 = time.perf_counter()
        u = measure_untrained_loss(rec.model, batches, loss_of, outputs)
        t1 = time.perf_counter()
        c = measure_constant_loss(batches, loss_of, outputs)
        t2 = time.perf_counter()
        twin_opt.zero_grad()
        loss = loss_of(twin, batches[0])
        loss.backward()
        twin_opt.step()
        t3 = time.perf_counter()
        times["untrained"].append(t1 - t0)
        times["constant"].append(t2 - t1)
        times["step"].append(t3 - t2)
        levels = {"untrained": float(u) if u is not None else float("nan"),
                  "constant": float(c) if c is not None else float("nan")}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"task": task, "family": fam.TASKS[task].family, **{f"{k}_ms": 1e3 * v
                                                                for k, v in med.items()},
            "constant_in_steps": med["constant"] / med["step"],
            "untrained_in_steps": med["untrained"] / med["step"], **levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| task | family | untrained (ms) | constant fit (ms) | step (ms) | fit in steps | "
          "constant / untrained |")
    print("|---|---|---|---|---|---|---|")
    for task in fam.TASKS:
        r = measure(task, a.repeats)
        rows.append(r)
        print(f"| {task} | {r['family']} | {r['untrained_ms']:.1f} | {r['constant_ms']:.1f} | "
              f"{r['step_ms']:.1f} | {r['constant_in_steps']:.1f} | "
              f"{r['constant'] / r['untrained']:.2f} |", flush=True)
    print(f"median fit cost: {statistics.median(r['constant_in_steps'] for r in rows):.1f} "
          f"steps, largest {max(r['constant_in_steps'] for r in rows):.1f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
