"""Helpers for the whole-stack tests: a generated serving stream, subprocess management, and
the substitution of Grafana's template variables in dashboard queries."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "rules"
DASHBOARDS_DIR = REPO / "grafana" / "dashboards"


def serving_record(rng: random.Random, i: int, shift: float = 0.0) -> dict[str, Any]:
    """One prediction record of a small binary classifier that sends its probabilities.

    ``x`` and ``y`` are standard normal, ``tier`` is categorical; the model's probability of
    class 1 is ``sigmoid(3 (x + y))`` (it predicts 1 when ``x + y > 0``). ``shift`` moves ``x``
    (covariate shift), which also moves the prediction distribution.
    """
    x = rng.gauss(shift, 1.0)
    y = rng.gauss(0.0, 1.0)
    return {"id": f"req-{i}", "features": {"x": round(x, 6), "y": round(y, 6),
                                           "tier": rng.choice(["free", "pro", "team"])},
            "prediction": round(1.0 / (1.0 + math.exp(-3.0 * (x + y))), 6)}


def true_label(rec: Mapping[str, Any], rng: random.Random, shifted: bool) -> int:
    """Ground truth: mostly what the model predicts; after the shift the concept changes too,
    so realised accuracy drops (and the estimate, which only sees confidences, misses it)."""
    f = rec["features"]
    score = f["x"] + f["y"] if not shifted else f["y"] - 0.5 * f["x"]
    return 1 if score + rng.gauss(0.0, 0.3) > 0 else 0


def write_reference_data(path: Path, n: int = 2000, seed: int = 0) -> Path:
    """Reference records with their labels (they fit the label-free accuracy estimator)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            rec = serving_record(rng, i)
            rec.pop("id")
            rec["label"] = true_label(rec, rng, False)
            fh.write(json.dumps(rec) + "\n")
    return path


class Proc:
    """A subprocess whose combined output goes to a log file; stopped with SIGTERM, then
    SIGKILL (only this process, by its pid)."""

    def __init__(self, args: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match[str]:
        """Poll the log until ``pattern`` matches; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited with {self.proc.returncode} before "
                                   f"printing {pattern!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not printed within {timeout:g}s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def lrwatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrwatch", *args]


# --- Grafana template variables ------------------------------------------------------------------

#: What Grafana would put in place of its built-in interval variables for a short test range.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
            "__interval_ms": "15000", "__range_s": "300", "__range_ms": "300000"}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$var``, ``${var}`` and ``[[var]]`` like Grafana does for single values.

    ``values`` holds the dashboard variables (``job``, ``instance``); the built-in interval
    variables come from :data:`BUILTINS`. An unknown variable raises ``KeyError`` so a typo in
    a dashboard cannot slip through as literal text.
    """
    table = {**BUILTINS, **values}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        name = name.split(":")[0]
        if name not in table:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return table[name]

    return re.sub(r"\$\{(\w+(?::\w+)?)\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def dashboard_exprs(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` for every Prometheus expression of a dashboard: panel targets (rows'
    nested panels too) and annotation queries."""
    def panels(ps: Any) -> Iterator[Mapping[str, Any]]:
        for p in ps or []:
            yield p
            yield from panels(p.get("panels"))

    for p in panels(dashboard.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f"panel {p.get('title')!r} ref {t.get('refId')}", t["expr"]
    for a in (dashboard.get("annotations") or {}).get("list") or []:
        expr = a.get("expr") or (a.get("target") or {}).get("expr")
        if expr:
            yield f"annotation {a.get('name')!r}", expr
