"""Rule files for tests that drive the recovery policy by hand: each rule fires when a metric
the test logs (a "flag": ``poison``, ``halt``, ...) goes above 0.5, with the actions the test
needs. One place for the YAML those tests used to write out rule by rule."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def flag_rule(name: str, metric: str, actions: Sequence[str] = ("rollback",), *,
              severity: str = "critical", hysteresis: int | None = None) -> str:
    """One rule, as a YAML list item: ``name`` fires while ``metric`` > 0.5."""
    extra = f"    hysteresis: {hysteresis}\n" if hysteresis is not None else ""
    return (f"  - name: {name}\n    metric: {metric}\n    detector: threshold\n"
            f"    params: {{above: 0.5}}\n{extra}    severity: {severity}\n"
            f"    actions: [{', '.join(actions)}]\n"
            f"    annotations: {{summary: \"{name} at step {{step}}\", "
            f"description: \"test rule\"}}\n")


def flag_rules(*rules: str) -> str:
    """A rule file's text from :func:`flag_rule` items."""
    return "version: 1\nrules:\n" + "".join(rules)


def write_flag_rules(path: Path, *rules: str) -> str:
    """Write :func:`flag_rules` to ``path``; returns the path as text (for ``rules=``)."""
    path.write_text(flag_rules(*rules))
    return str(path)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    """One step of a 6-feature, 2-class model on batch ``i`` (16 rows, seeded by ``i``)."""
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


#: A non-finite loss rolls the run back, as a list item for :func:`flag_rules`.
NONFINITE_ROLLBACK_RULE = (
    "  - name: nonfinite\n    metric: loss\n    detector: nonfinite\n    severity: critical\n"
    "    actions: [rollback]\n"
    "    annotations: {summary: \"loss is {value} at step {step}\", description: \"test rule\"}\n")

#: That rule alone as a rule file (the tests of a NaN batch's rollback).
NONFINITE_ROLLBACK = flag_rules(NONFINITE_ROLLBACK_RULE)
