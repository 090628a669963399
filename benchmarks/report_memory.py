"""Peak memory (resident set) of ``lrwatch report`` against the length of the trace.

Writes a generated trace per length (the keys a Watcher writes: loss, an evaluation every 100
steps, two parameter groups' rates, the gradient norm, the update ratio every 10th step, step
time, a few firings and a rollback, a stretch of NaN losses), then runs ``lrwatch report TRACE
--out X.png`` (and ``.html`` with ``--html``) in a child process per length and reads the
child's peak resident set from the operating system (``getrusage``'s ``ru_maxrss``). A
benchmark, not a test: the numbers go to docs/design.md ("Reading runs back").

    python benchmarks/report_memory.py                       # 10k, 100k and 1M steps
    python benchmarks/report_memory.py --steps 20000 200000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_trace(path: Path, steps: int) -> None:
    """A deterministic trace of ``steps`` lines (no randomness: a run repeats exactly)."""
    rollback_at, nan_from = steps // 2, steps * 3 // 4
    with open(path, "w", encoding="utf-8") as f:
        for s in range(1, steps + 1):
            loss = 3.0 / math.sqrt(s) + 0.05 * math.sin(s / 7.0)
            rec: dict[str, object] = {
                "step": s, "time": 1.7e9 + 0.1 * s,
                "lr": [1e-3 * (0.5 ** (s // 40_000)), 1e-4], "grad_norm": 1.0 + 0.3 * math.cos(s),
                "step_time_seconds": 0.1, "loss": "nan" if nan_from <= s < nan_from + 20 else loss}
            if s % 10 == 0:
                rec["update_ratio"] = 1e-3 / (1 + s / 1e5)
            if s % 100 == 0:
                rec["eval_loss"] = loss * 1.1
                rec["eval_accuracy"] = 1 - loss / 4
            if s == rollback_at:
                rec["events"] = [
                    {"type": "firing", "step": s, "rule": "loss_spike", "severity": "critical",
                     "value": loss, "actions": ["rollback"], "message": "spike"},
                    {"type": "rollback", "step": s, "rule": "loss_spike", "to_step": s - 50,
                     "lr_factor": 0.5, "reason": "loss_spike"}]
            f.write(json.dumps(rec) + "\n")


def peak_rss_mib(trace: Path, out: Path) -> tuple[float, float]:
    """The report command's peak resident set (MiB) and wall seconds, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lrwatch", "report", str(trace), "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lrwatch report failed on {trace}")
    return usage.ru_maxrss / 1024.0, wall   # (Linux: kilobytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--html", action="store_true", help="also the .html report")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.steps:
            trace = Path(tmp) / f"run{n}.jsonl"
            write_trace(trace, n)
            for suffix in (".png", ".html") if args.html else (".png",):
                rss, wall = peak_rss_mib(trace, Path(tmp) / f"report{n}{suffix}")
                rows.append({"steps": n, "out": suffix, "trace_mib": trace.stat().st_size / 2**20,
                             "peak_rss_mib": rss, "wall_s": wall})
            trace.unlink()
    print("| steps | output | trace (MiB) | peak RSS (MiB) | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']:,} | {r['out']} | {r['trace_mib']:.0f} | {r['peak_rss_mib']:.0f} "
              f"| {r['wall_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
