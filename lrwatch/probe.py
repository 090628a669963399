"""On-device statistics for the training step, with no host synchronisation.

Everything here returns tensors that stay on the device they were computed on. The Watcher keeps
them in a small per-flush buffer and copies them to the host in one transfer every
``flush_every`` steps. Norms use the fused ``torch._foreach_norm`` kernels, grouped by device and
dtype exactly as ``torch.nn.utils.clip_grad_norm_`` groups them, so a model with a thousand
parameters costs a handful of kernel launches, not a thousand ``.item()`` calls.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import torch

__all__ = ["tensor_norms", "total_norm", "GradGuard", "HostGradGuard", "AUTO_FLOOR",
           "AUTO_MULT", "drop_gradient", "hold_gradients", "return_gradients", "layer_of",
           "LayerIndex"]


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of every tensor, as 0-d float32 tensors on each tensor's device.

    Tensors are grouped by (device, dtype) so each group is one fused ``_foreach_norm`` call.
    """
    if not tensors:
        return []
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:   # a sparse gradient (nn.Embedding(sparse=True)): the
            # norm of its values once duplicates are summed (no fused kernel takes it)
            vals = t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
            out[i] = torch.linalg.vector_norm(vals.float())
            continue
        groups[(t.device, t.dtype)].append(i)
    for (_dev, _dt), idx in groups.items():
        group = [tensors[i] for i in idx]
        if hasattr(torch, "_foreach_norm"):
            norms = torch._foreach_norm(group, 2.0)
        else:  # pragma: no cover - very old torch
            norms = [torch.linalg.vector_norm(t) for t in group]
        for i, n in zip(idx, norms):
            out[i] = n
    return [n.float() if n.dtype != torch.float32 else n for n in out]  # type: ignore[union-attr]


def total_norm(norms: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Global L2 norm from per-tensor norms (sqrt of the sum of squares), on ``device``.

    A NaN or Inf anywhere propagates into the result, which is how non-finite gradients are
    flagged without a separate check.
    """
    if not norms:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(_stack_on(norms, device), 2.0)


def _stack_on(norms: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors on ``device``; moves them one by one only when they are elsewhere."""
    try:
        stacked = torch.stack(list(norms))
    except RuntimeError:  # norms on several devices (a model split across GPUs)
        return torch.stack([n.to(device, non_blocking=True) for n in norms])
    return stacked if stacked.device == device else stacked.to(device, non_blocking=True)


#: ``guard_ratio="auto"``: a step is a spike above ``max(AUTO_FLOOR, AUTO_MULT x the largest
#: ratio of a kept step so far)``. The floor: the largest ratio on 60 healthy runs of five
#: held-out families was 19.4 (docs/recovery.md, "Held-out check of the spike threshold");
#: the factor: a run whose own steps spiked (a NALU, a keypoint locator: 30-3,500x) lifts its
#: threshold above them, a quiet one keeps 20 (a poisoned batch 40x a pointer network's
#: median is held). Replayed on 503 healthy traces of 41 families it holds no tuned run twice
#: more than the fixed 100 does (``benchmarks/guard_scan.py``).
AUTO_FLOOR = 20.0
AUTO_MULT = 3.0


def _ratio_setting(ratio: float | str) -> tuple[float, bool]:
    """(the fixed ratio, or the floor; whether it adapts) of a ``guard_ratio``."""
    if ratio == "auto":
        return AUTO_FLOOR, True
    return float(ratio), False


class GradGuard:
    """Which steps to keep off the parameters, decided on the device (no host sync): a step
    whose gradient norm is not finite, or more than ``ratio`` times the median of the last
    ``window`` kept steps' norms once ``warmup`` of them exist (``ratio=0``: non-finite only;
    ``"auto"``: more than ``max(AUTO_FLOOR, AUTO_MULT x the largest ratio of a kept step)``).

    The median is of kept steps only (a dropped step leaves the reference as it was), so a run
    of spikes does not raise its own reference. The default ratio, 100, is 3.5 times the
    largest ratio seen on 137 healthy runs of six model families (28.5; the 99.9th percentile
    per family 2.9-7.6; docs/recovery.md), while a batch of garbage inputs moves the norm by
    orders of magnitude. Costs a handful of scalar kernels per step.
    """

    def __init__(self, device: torch.device, *, ratio: float | str = 100.0, window: int = 50,
                 warmup: int = 20) -> None:
        self.ratio, self.adaptive = _ratio_setting(ratio)
        self.window, self.warmup = int(window), int(warmup)
        self._norms = torch.full((self.window,), float("nan"), device=device)
        self._largest = torch.zeros((), device=device)   # of a kept step's ratio ("auto")
        self._i = 0

    def bad(self, norm: torch.Tensor) -> torch.Tensor:
        """The step's verdict (a 0-d bool tensor) from its gradient norm; remembers the norm."""
        norm = norm.to(self._norms.device, torch.float32)
        bad = ~torch.isfinite(norm)
        if self.ratio > 0:
            warm = (~torch.isnan(self._norms)).sum() >= self.warmup
            ratio = norm / torch.nanmedian(self._norms)
            limit = (torch.clamp(AUTO_MULT * self._largest, min=self.ratio) if self.adaptive
                     else self.ratio)
            bad = bad | (warm & (ratio > limit))
            if self.adaptive:
                grow = warm & ~bad
                self._largest = torch.where(grow, torch.maximum(self._largest, ratio),
                                            self._largest)
        slot = self._i % self.window
        self._norms[slot] = torch.where(bad, self._norms[slot], norm)   # kept steps only
        self._i += 1
        return bad


class HostGradGuard:
    """:class:`GradGuard`'s verdict on the host, for parameters on the CPU, where reading a
    number from a tensor waits for nothing: the same rule (not finite, or more than ``ratio``
    times the lower median of the last ``window`` kept norms once ``warmup`` of them exist;
    ``"auto"``: the threshold that adapts) on Python floats, a few microseconds per step where
    the tensor version launches a handful of small kernels (measured in docs/overhead.md,
    "The guard on the CPU").

    >>> g = HostGradGuard(ratio=100.0, window=50, warmup=3)
    >>> [g.bad(x) for x in (1.0, 2.0, 1.5, 1000.0, float("nan"), 3.0)]
    [False, False, False, True, True, False]
    >>> g = HostGradGuard(ratio="auto", window=50, warmup=3)
    >>> [g.bad(x) for x in (1.0, 1.0, 1.0, 15.0, 1.0, 40.0, 1.0, 200.0)]
    [False, False, False, False, False, False, False, True]
    """

    def __init__(self, *, ratio: float | str = 100.0, window: int = 50,
                 warmup: int = 20) -> None:
        self.ratio, self.adaptive = _ratio_setting(ratio)
        self.window, self.warmup = int(window), int(warmup)
        self._norms: list[float | None] = [None] * self.window
        self._largest = 0.0
        self._i = 0

    def bad(self, norm: float) -> bool:
        """The step's verdict from its gradient norm; remembers the norm of a kept step."""
        bad = not math.isfinite(norm)
        ratio = None
        if not bad and self.ratio > 0:
            kept = sorted(v for v in self._norms if v is not None)
            if len(kept) >= self.warmup:
                med = kept[(len(kept) - 1) // 2]
                ratio = norm / med if med > 0 else math.inf
                limit = (max(self.ratio, AUTO_MULT * self._largest) if self.adaptive
                         else self.ratio)
                bad = ratio > limit
        if not bad:
            self._norms[self._i % self.window] = norm
            if self.adaptive and ratio is not None:
                self._largest = max(self._largest, ratio)
        self._i += 1
        return bad


def hold_gradients(params: Sequence[torch.nn.Parameter]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Take every parameter's gradient away for one optimizer step (``p.grad = None``): every
    torch optimizer then leaves the parameter and its state alone, as a fused step skips on
    ``found_inf``. Returns what :func:`return_gradients` puts back after the step, so the
    caller's gradients are as they were."""
    held = [(p, p.grad) for p in params if p.grad is not None]
    for p, _ in held:
        p.grad = None
    return held


def return_gradients(held: Sequence[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Undo :func:`hold_gradients` (after the optimizer's step)."""
    for p, g in held:
        if p.grad is None:
            p.grad = g


def drop_gradient(grads: Sequence[torch.Tensor], bad: torch.Tensor) -> None:
    """Zero every gradient, in place and on the device, when ``bad`` (a 0-d bool tensor).

    The optimizer then takes a step on a zero gradient instead of writing NaN (or a garbage
    batch's update) into every parameter it touches. On a kept step the gradients are unchanged
    bit for bit: ``nan_to_num_`` leaves finite values alone and they are multiplied by exactly
    1. Costs one in-place pass per gradient tensor and one fused multiply per (device, dtype)
    group (on CPU a 0-d-masked ``masked_fill_`` measured five times slower).
    """
    keep = ~bad
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    for (dev, dt), group in groups.items():
        for g in group:
            g.nan_to_num_(0.0, 0.0, 0.0)
        factor = keep.to(device=dev, dtype=dt, non_blocking=True)
        if hasattr(torch, "_foreach_mul_"):
            torch._foreach_mul_(group, factor)
        else:  # pragma: no cover - very old torch
            for g in group:
                g.mul_(factor)


def layer_of(name: str, depth: int = 1) -> str:
    """The bounded label for a parameter: its top-``depth`` module path.

    >>> layer_of("encoder.layers.3.attn.weight")
    'encoder'
    >>> layer_of("encoder.layers.3.attn.weight", depth=3)
    'encoder.layers.3'
    >>> layer_of("bias")
    'bias'
    """
    parts = name.split(".")
    if len(parts) <= depth:
        return parts[0] if len(parts) == 1 else ".".join(parts[:-1]) or parts[0]
    return ".".join(parts[:depth])


class LayerIndex:
    """Maps parameters to a bounded set of layer labels and sums squared norms per layer.

    The per-layer sum is one ``index_add_`` on the device; the index tensor is cached per set of
    parameters that have gradients (usually the same set every step).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], depth: int = 1,
                 max_layers: int = 64) -> None:
        self.labels: list[str] = []
        self._layer_of_param: dict[int, int] = {}
        for name, p in named_params:
            label = layer_of(name, depth)
            if label not in self.labels:
                if len(self.labels) >= max_layers:
                    label = "other"
                    if label not in self.labels:
                        self.labels.append(label)
                else:
                    self.labels.append(label)
            self._layer_of_param[id(p)] = self.labels.index(label)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def per_layer(self, params: Sequence[torch.Tensor], norms: Sequence[torch.Tensor],
                  device: torch.device) -> torch.Tensor:
        """Per-layer L2 norms (a 1-d tensor ordered like ``labels``) from per-parameter norms."""
        key = tuple(self._layer_of_param.get(id(p), -1) for p in params)
        index = self._cache.get(key)
        if index is None:
            # built on the host and sent without waiting (a blocking copy is a host sync)
            index = torch.tensor([k if k >= 0 else 0 for k in key],
                                 dtype=torch.long).to(device, non_blocking=True)
            self._cache[key] = index
        sq = _stack_on(norms, device).square()
        sums = torch.zeros(len(self.labels), device=device, dtype=sq.dtype)
        sums.index_add_(0, index, sq)
        return sums.sqrt()
