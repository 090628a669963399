"""How fast `lrwatch replay` runs the default training pack over many traces (the issue's
target: at most 1 s per 100 traces).

The traces are generated here (seeded), shaped like the Watcher's: every step's `lr`, `loss`,
`grad_norm`, `momentum/0`, `step_time_seconds`, `samples_per_second` and the non-finite
flags, `update_ratio` every 10th step, an evaluation (`eval_loss`, `eval_accuracy`) every 50
steps. A run decays its loss with noise; one in five has a fault (a NaN step, a loss blow-up,
or an evaluation drop), so the rules fire and their events are formatted as they are in real
use. Two measurements:

* in-process: :func:`lrwatch.rules.replay.replay_trace` over every trace in one process, CPU
  time (``time.process_time``: what a loaded, shared machine distorts least) and wall time;
* the command: ``lrwatch replay --json --no-progress DIR -j J`` as a user runs it, wall time
  and the children's CPU time, less the same command on one short trace (start-up: the
  interpreter, the imports, the pack).

Prints a markdown table per 100 traces; ``--json OUT`` writes the numbers. Timings, not a
test: on a shared machine read the CPU-time columns, and repeat (``--repeat``).

    python benchmarks/replay_speed.py                       # 100 traces of 300 steps
    python benchmarks/replay_speed.py --traces 400 --steps 600 --jobs 1 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lrwatch.rules import load_pack  # noqa: E402
from lrwatch.rules.replay import replay_trace  # noqa: E402

TARGET_S_PER_100 = 1.0
FAULTS = ("nan", "blowup", "eval_drop")


def trace_lines(seed: int, steps: int) -> list[str]:
    """One run's trace lines (seeded): a noisy decaying loss; one run in five with a fault."""
    rng = random.Random(seed)
    fault = FAULTS[seed // 5 % len(FAULTS)] if seed % 5 == 4 else None
    onset = rng.randint(steps // 3, 2 * steps // 3)
    lr, loss0, floor = 10 ** rng.uniform(-4, -2), rng.uniform(1.0, 3.0), rng.uniform(0.05, 0.5)
    t = 1.7e9 + seed * 1e4
    acc = 0.5
    lines = []
    for step in range(1, steps + 1):
        t += rng.uniform(0.08, 0.12)
        loss = floor + (loss0 - floor) * math.exp(-step / (steps / 4))
        loss *= math.exp(rng.gauss(0.0, 0.05))
        gn = 1.0 + 0.3 * rng.random()
        rec: dict[str, Any] = {"step": step, "time": t, "lr": lr, "loss": loss, "grad_norm": gn,
                               "momentum/0": 0.9, "step_time_seconds": 0.1,
                               "samples_per_second": 320.0, "nonfinite_loss": 0.0,
                               "nonfinite_grad": 0.0}
        if fault == "nan" and step == onset:
            rec.update(loss="nan", grad_norm="nan", nonfinite_loss=1.0, nonfinite_grad=1.0)
        elif fault == "blowup" and step >= onset:
            rec.update(loss=loss * 1.5 ** min(step - onset, 40), grad_norm=gn * 30)
        if step % 10 == 0:
            rec["update_ratio"] = 1e-3 * math.exp(rng.gauss(0.0, 0.1))
        if step % 50 == 0:
            acc = min(0.95, acc + 0.05 * rng.random())
            drop = 0.3 if fault == "eval_drop" and step >= onset else 0.0
            rec["eval_accuracy"] = acc - drop + rng.gauss(0.0, 0.005)
            rec["eval_loss"] = loss * (1.1 + 3 * drop)
        lines.append(json.dumps(rec))
    return lines


def write_traces(directory: Path, n: int, steps: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = directory / f"run{i:04d}.jsonl"
        p.write_text("\n".join(trace_lines(i, steps)) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def in_process(paths: list[Path]) -> dict[str, float]:
    """Replay every trace in this process; CPU and wall seconds, firings."""
    rules = load_pack("training")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    firings = errors = 0
    for p in paths:
        res = replay_trace(p, rules)
        firings += sum(e.kind == "firing" for e in res.events)
        errors += res.error is not None
    return {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
            "firings": firings, "errors": errors}


def command(args: list[str]) -> dict[str, float]:
    """``lrwatch replay ARGS`` as a subprocess: wall seconds and the children's CPU seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lrwatch", "replay", "--json", "--no-progress",
                           *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"lrwatch replay exited {proc.returncode}: {proc.stderr[-2000:]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "lines": proc.stdout.count(b"\n")}


def measure(n: int, steps: int, jobs: list[int], repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lrwatch-replay-speed-") as tmp:
        root = Path(tmp)
        (root / "runs").mkdir()
        paths = write_traces(root / "runs", n, steps)
        (root / "one").mkdir()
        one = write_traces(root / "one", 1, 20)
        per100 = 100.0 / n
        rows: list[dict[str, Any]] = []
        for _ in range(repeat):
            r = in_process(paths)
            rows.append({"how": "in-process (1 process)", "jobs": 1,
                         "cpu_s_per_100": r["cpu_s"] * per100,
                         "wall_s_per_100": r["wall_s"] * per100, "firings": r["firings"],
                         "errors": r["errors"]})
            start = command([str(one[0]), "-j", "1"])
            for j in jobs:
                c = command([str(root / "runs"), "-j", str(j)])
                rows.append({"how": "lrwatch replay DIR", "jobs": j,
                             "cpu_s_per_100": max(c["cpu_s"] - start["cpu_s"], 0) * per100,
                             "wall_s_per_100": c["wall_s"] * per100,
                             "wall_less_startup_s_per_100":
                                 max(c["wall_s"] - start["wall_s"], 0) * per100,
                             "startup_s": start["wall_s"], "firings": c["lines"]})
    return {"traces": n, "steps": steps, "target_s_per_100": TARGET_S_PER_100,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    out = [f"{result['traces']} traces of {result['steps']} steps, {result['cpus']} CPUs, "
           f"load {result['load_avg'][0]:.1f} at the end; target <= "
           f"{result['target_s_per_100']:g} s per 100 traces", "",
           "| how | jobs | CPU s / 100 (median) | wall s / 100 (median) | wall less start-up | "
           "firings |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["how"], r["jobs"]) for r in result["rows"]})
    for how, j in keys:
        rs = [r for r in result["rows"] if (r["how"], r["jobs"]) == (how, j)]
        less = [r["wall_less_startup_s_per_100"] for r in rs if "wall_less_startup_s_per_100" in r]
        out.append(f"| {how} | {j} | {statistics.median(r['cpu_s_per_100'] for r in rs):.2f} | "
                   f"{statistics.median(r['wall_s_per_100'] for r in rs):.2f} | "
                   f"{f'{statistics.median(less):.2f}' if less else '-'} | {rs[0]['firings']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=100, help="traces to replay (default 100)")
    ap.add_argument("--steps", type=int, default=300, help="steps per trace (default 300)")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2],
                    help="`lrwatch replay -j` values to time (default 1 2)")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (default 1)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    a = ap.parse_args(argv)
    if a.traces < 1 or a.steps < 50 or a.repeat < 1 or min(a.jobs) < 1:
        ap.error("--traces, --repeat and --jobs must be at least 1, --steps at least 50")
    result = measure(a.traces, a.steps, a.jobs, a.repeat)
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
