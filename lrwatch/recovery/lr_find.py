"""The learning-rate range test on a real model, leaving the model exactly as it found it.

:func:`lr_find` trains a few dozen steps at exponentially increasing learning rates (the
decision half, when to stop and what to suggest, is the pure :class:`~lrwatch.recovery.curve.
RangeTest`), then puts everything back: parameters, buffers, gradients, the optimizer's state
and param groups, the scheduler, the GradScaler, the RNG states and the data loader's sampler
generators, bit for bit. The probe runs in place rather than on a deep copy, so it works for
wrapped models (DDP, FSDP) whose copies would not take part in the collectives; what it saves
is one copy of the state, as a snapshot does.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ..actions.scheduler_state import restorable, scheduler_state
from ..actions.snapshot import _rng_state, _set_rng_state
from ..errors import ConfigError
from .curve import LRCurve, RangeTest, geometric_rates
from .throwaway import throwaway_steps

__all__ = ["lr_find", "run_range_test", "SavedTraining", "BatchLoss", "configured_rates",
           "leading_rate"]

#: ``batch_loss(model, batch) -> loss``: one step's scalar loss (with the graph).
BatchLoss = Callable[[torch.nn.Module, Any], torch.Tensor]


def _generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader draws its order from (iterating advances
    them, which would move the user's data order)."""
    found: list[torch.Generator] = []
    for obj in (loader, getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


@contextlib.contextmanager
def _own_workers(loader: Any) -> Iterator[None]:
    """A DataLoader with ``persistent_workers`` keeps its iterator (and its worker processes)
    for the next pass, which then only resets it: iterated by the test, the run's first pass
    would reuse the test's workers and draw its order without the base seed a fresh iterator
    draws first (a different order), and a pass in progress would be reset under the run.
    So the test iterates with workers of its own, shut down after it, and the loader gets
    back the iterator it had (or none)."""
    if not (isinstance(loader, torch.utils.data.DataLoader)
            and getattr(loader, "persistent_workers", False) and loader.num_workers > 0):
        yield
        return
    saved = loader._iterator
    loader._iterator = None
    try:
        yield
    finally:
        mine = loader._iterator
        loader._iterator = saved
        if mine is not None and mine is not saved:
            mine._shutdown_workers()


def _copy_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)


def _buffer_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """Every buffer slot, as (module, name, the tensor in it now). A module may *rebind* a
    buffer in its forward (``self.count = self.count + 1``, an EMA written as
    ``self.avg = 0.9 * self.avg + ...``): the slot then holds a new tensor, and copying the
    saved values into the old one would leave the new one in place."""
    return [(m, name, b) for m in model.modules() for name, b in m._buffers.items()]


def _rebind(slots: list[tuple[torch.nn.Module, str, Any]]) -> None:
    """Put each buffer slot's tensor of :func:`_buffer_slots` back (its values are the
    caller's to restore)."""
    for m, name, b in slots:
        if m._buffers.get(name) is not b:
            m._buffers[name] = b


@dataclass
class SavedTraining:
    """Everything a probe may change, kept so that :meth:`restore` puts it back bit for bit."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]
    grads: list[tuple[torch.Tensor, torch.Tensor | None]]
    modes: list[tuple[torch.nn.Module, bool]]
    groups: list[dict[str, Any]]
    opt_state: dict[torch.Tensor, dict[str, Any]]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    generators: list[tuple[torch.Generator, torch.Tensor]]
    buffers: list[tuple[torch.nn.Module, str, Any]] = field(default_factory=list)

    @classmethod
    def capture(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any = None, scaler: Any = None, loader: Any = None
                ) -> "SavedTraining":
        seen: set[int] = set()
        tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for t in [*model.parameters(), *params, *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append((t, t.detach().clone()))
        grads = [(t, None if t.grad is None else t.grad.detach().clone())
                 for t, _ in tensors if isinstance(t, torch.nn.Parameter) or t.requires_grad]
        groups = [{k: _copy_value(v) for k, v in g.items() if k != "params"}
                  for g in optimizer.param_groups]
        opt_state = {p: {k: _copy_value(v) for k, v in st.items()}
                     for p, st in optimizer.state.items()}
        return cls(tensors, grads, [(m, m.training) for m in model.modules()], groups,
                   opt_state,
                   scheduler_state(scheduler, copy.deepcopy),   # (None: one without)
                   copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
                   _rng_state(), [(g, g.get_state()) for g in _generators(loader)],
                   _buffer_slots(model))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any = None, scaler: Any = None) -> None:
        """Put everything back in place (tensors keep their identity, and a buffer the
        model rebound holds its own tensor again)."""
        _rebind(self.buffers)
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            for t, g in self.grads:
                t.grad = None if g is None else g.clone()
        for m, training in self.modes:
            m.train(training)
        for group, saved_group in zip(optimizer.param_groups, self.groups):
            for k in [k for k in group if k != "params" and k not in saved_group]:
                del group[k]
            for k, v in saved_group.items():
                cur = group.get(k)
                if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor):
                    with torch.no_grad():
                        cur.copy_(v)   # a tensor lr (capturable) keeps its identity
                else:
                    group[k] = _copy_value(v)
        state = optimizer.state
        for p in [p for p in state if p not in self.opt_state]:
            del state[p]
        for p, saved_st in self.opt_state.items():
            st = state[p]
            for k in [k for k in st if k not in saved_st]:
                del st[k]
            for k, v in saved_st.items():
                cur = st.get(k)
                if (isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor)
                        and cur.shape == v.shape and cur.dtype == v.dtype):
                    with torch.no_grad():
                        cur.copy_(v)
                else:
                    st[k] = _copy_value(v)
        if restorable(scheduler) and self.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(copy.deepcopy(self.scaler))
        _set_rng_state(self.rng)
        for g, st in self.generators:
            g.set_state(st)


#: why a range test (the start check, ``lr_check``, a rollback's probe) cannot run
NO_RATES = ("the optimizer's parameter groups hold no learning rate to set ('lr' absent or "
            "None, as in Adafactor with relative_step=True)")


def rates_settable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group holds a learning rate a range test can set: ``lr`` a
    number or a tensor. Adafactor with ``relative_step=True`` holds ``lr=None`` (it computes
    its own step size), and an optimizer of one's own may hold none at all."""
    def settable(lr: Any) -> bool:
        return isinstance(lr, torch.Tensor) or (isinstance(lr, (int, float))
                                                and not isinstance(lr, bool))
    return bool(optimizer.param_groups) and all(settable(g.get("lr"))
                                                for g in optimizer.param_groups)


def set_group_rates(optimizer: torch.optim.Optimizer, rates: Iterable[Any]) -> None:
    """Set each parameter group's rate (a number, or a tensor for a tensor rate, which keeps
    its identity: a capturable optimizer holds on to it)."""
    for group, lr in zip(optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            with torch.no_grad():
                group["lr"].copy_(lr) if isinstance(lr, torch.Tensor) else group["lr"].fill_(lr)
        else:
            group["lr"] = float(lr)


def _set_rate(optimizer: torch.optim.Optimizer, ratios: list[float], lr: float) -> None:
    set_group_rates(optimizer, [lr * r for r in ratios])


def configured_rates(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> list[float]:
    """Each group's configured rate: the schedule's base rate (its peak, for a warm-up that
    starts at 0), else the rate the optimizer was built with (``initial_lr``), else its rate
    now."""
    base = list(getattr(scheduler, "base_lrs", None) or ()) if scheduler is not None else []
    return [float(base[i]) if i < len(base) else float(g.get("initial_lr", g["lr"]))
            for i, g in enumerate(optimizer.param_groups)]


def _group_ratios(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> list[float]:
    """Each group's rate relative to group 0's, so the probe keeps the groups' proportions:
    the rates now, or where group 0's is 0 now (a warm-up from 0), the configured ones. A
    group 0 configured at 0 (frozen by its rate) stays at 0: the first group with a rate
    leads (:func:`leading_rate`)."""
    candidates = ([float(g["lr"]) for g in optimizer.param_groups],
                  configured_rates(optimizer, scheduler))
    for lrs in candidates:
        if lrs[0] > 0:
            return [x / lrs[0] for x in lrs]
    for lrs in candidates:
        lead = next((x for x in lrs if x > 0), None)
        if lead is not None:
            return [x / lead for x in lrs]
    return [1.0] * len(optimizer.param_groups)


def leading_rate(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> tuple[int, float]:
    """The group whose rates a range test's curve gives, and its configured rate: group 0,
    or when it is configured at 0 (frozen by its rate), the first group with a rate."""
    rates = configured_rates(optimizer, scheduler)
    i = next((i for i, x in enumerate(rates) if x > 0), 0)
    return i, rates[i]


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Batches, starting the iterable over when it runs out (a short loader still probes)."""
    total = 0
    while True:
        it = iter(batches)
        first = True
        for b in it:
            first = False
            total += 1
            yield b
        if first and total:
            raise ConfigError(f"the loader yielded {total} batches, then none when iterated "
                              f"again; a range test longer than the loader goes over it again: "
                              f"give a loader that can be iterated more than once (a "
                              f"DataLoader, a list of batches), or fewer steps")
        if first:
            raise ConfigError("the loader yielded no batch; the range test needs data")


def _check_reiterable(loader: Any) -> None:
    """``lr_find`` leaves the data where it was: a one-shot iterator (a generator,
    ``iter(loader)``) would lose every batch the test draws from it, so it is refused before
    anything is drawn."""
    if isinstance(loader, collections.abc.Iterator):
        raise ConfigError(
            f"lr_find got an iterator ({type(loader).__name__}) as its loader: the test would "
            f"consume the batches it draws, and the training loop would never see them; give "
            f"something it can iterate afresh (the DataLoader itself, a list of batches; for "
            f"a stream, list(itertools.islice(stream, n)))")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
               batch_loss: BatchLoss, batch: Any,
               sync: Callable[[], None] | None = None,
               clip: float | None = None) -> torch.Tensor:
    """One throw-away training step of a probe (a range test, the start check's shadow), with
    the run's ``GradScaler`` when it has one; returns the loss. ``sync`` runs between the
    backward pass and the optimizer step (the shadow averages its gradients over the ranks
    there when no wrapper does it); ``clip``: the total gradient norm is clipped to it, as
    the run's own step does (``RecoveryConfig.clip_grad_norm``)."""
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        if sync is not None:
            sync()
        if clip is not None:
            scaler.unscale_(optimizer)
            _clip(model, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if sync is not None:
            sync()
        if clip is not None:
            _clip(model, clip)
        optimizer.step()
    return loss


def _clip(model: torch.nn.Module, max_norm: float) -> None:
    """``clip_grad_norm_`` over the model's parameters in their own order (the order the
    frameworks clip in: the total norm is a sum, and its rounding follows the order)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def run_range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   batches: Iterator[Any], batch_loss: BatchLoss, test: RangeTest, *,
                   scaler: Any = None, reduce: Callable[[float], float] | None = None,
                   reference: Any = None, clip: float | None = None,
                   scheduler: Any = None) -> LRCurve:
    """Run the steps of ``test`` on the model as it is (the caller saves and restores).

    ``reduce`` turns a rank's loss into the loss every rank agrees on (a mean over the
    process group), so that all ranks stop at the same step and suggest the same rate.

    With a ``reference`` batch, the curve is the loss of that one batch, evaluated (one
    forward, no backward, dropout off) before the first step and after each step, instead of
    the loss of the batch just trained on: its changes are the model's, not the differences
    between batches. ``curve.extra`` then has ``baseline`` (the loss before the first step),
    ``forwards`` (the extra forwards run) and ``batch_losses`` (the training batches' losses).
    ``scheduler``: where group 0's rate is 0 now (a warm-up from 0), the groups keep the
    proportions of the schedule's base rates.
    """
    ratios = _group_ratios(optimizer, scheduler)
    model.train()
    agree = reduce if reduce is not None else (lambda x: x)
    baseline = agree(reference_loss(model, batch_loss, reference)) if reference is not None \
        else None
    trained: list[float] = []
    while (lr := test.next_lr) is not None:
        _set_rate(optimizer, ratios, lr)
        loss = train_step(model, optimizer, scaler, batch_loss, next(batches), clip=clip)
        value = agree(float(loss.detach()))   # one host sync per probe step: it must decide
        if reference is not None:
            trained.append(value)
            value = agree(reference_loss(model, batch_loss, reference))
        if test.update(value):
            break
    curve = test.curve()
    if reference is not None:
        curve.extra.update(baseline=baseline, forwards=len(trained) + 1, batch_losses=trained)
    return curve


def reference_loss(model: torch.nn.Module, batch_loss: BatchLoss, batch: Any) -> float:
    """The loss of ``batch`` without a gradient and with dropout off (so the same weights give
    the same loss); other modules keep their mode (batch norm in training mode normalises
    with the batch's own statistics, as in the training step). The buffers are put back as
    they were (a scoring pass is not a training step: batch norm's running statistics, and
    any counter a forward keeps, must not move)."""
    drop = [m for m in model.modules()
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    slots = _buffer_slots(model)
    saved = [(b, b.detach().clone()) for _, _, b in slots if b is not None]
    for m in drop:
        m.eval()
    try:
        with torch.no_grad():
            return float(batch_loss(model, batch))
    finally:
        for m in drop:
            m.train()
        _rebind(slots)
        with torch.no_grad():
            for buf, was in saved:
                buf.copy_(was)


def _dist_mean(group: Any) -> Callable[[float], float] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)

    def mean(x: float) -> float:
        t = torch.tensor([x if math.isfinite(x) else math.inf], dtype=torch.float64)
        if dist.get_backend(group) == "nccl":   # pragma: no cover - needs GPUs
            t = t.cuda()
        dist.all_reduce(t, group=group)
        return float(t) / world

    return mean


class PeerFailed(RuntimeError):
    """A probe (the start check, a range test) failed on another rank: this one gives it
    up too."""


def _agreed(call: Callable[[], Any], agree: Callable[[float], float]) -> Any:
    """``call()`` (a ``probe_loss`` forward), then whether every rank's succeeded: where one
    raised, every rank raises (that one its own error, the others :class:`PeerFailed`), so
    that no rank is left waiting in the next collective (the held-out losses' mean, the
    wrapper's gradient reduction). Outside ``torch.distributed`` ``agree`` is the identity:
    the error is raised as it was."""
    try:
        out, err = call(), None
    except Exception as exc:
        out, err = None, exc
    if agree(0.0 if err is None else math.inf) != 0.0:
        if err is not None:
            raise err
        raise PeerFailed("probe_loss failed on another rank")
    return out


def agreed_loss(batch_loss: BatchLoss, agree: Callable[[float], float]) -> BatchLoss:
    """``batch_loss`` whose failure on any rank raises on every rank (:func:`_agreed`);
    ``agree``: the mean over the ranks (:func:`_dist_mean`)."""
    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return _agreed(lambda: batch_loss(model, batch), agree)
    return loss


def _batch_loss_of(loss_fn: Callable[..., torch.Tensor] | None,
                   batch_loss: BatchLoss | None) -> BatchLoss:
    """``batch_loss``, or one made of ``loss_fn`` for ``(inputs, targets)`` batches; exactly
    one of them must be given."""
    if (loss_fn is None) == (batch_loss is None):
        raise ConfigError("lr_find needs exactly one of loss_fn (called as "
                          "loss_fn(model(inputs), targets)) or batch_loss(model, batch)")
    if batch_loss is not None:
        return batch_loss
    fn = loss_fn

    def from_loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError("loss_fn needs (inputs, targets) batches; for other batches "
                              "pass batch_loss=lambda model, batch: ... instead")
        return fn(m(batch[0]), batch[1])  # type: ignore[misc]

    return from_loss_fn


def lr_find(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Any],
            loss_fn: Callable[..., torch.Tensor] | None = None, *,
            batch_loss: BatchLoss | None = None, scheduler: Any = None, scaler: Any = None,
            min_lr: float = 1e-7, max_lr: float = 10.0, num_steps: int = 100,
            rule: str = "stable", fraction: float = 0.3, beta: float = 0.9,
            diverge: float = 4.0, process_group: Any = None) -> LRCurve:
    """Learning-rate range test: which rate to train at, measured on your model and data.

    Trains ``num_steps`` steps at rates growing geometrically from ``min_lr`` to ``max_lr``
    (stopping early once the smoothed loss is ``diverge`` times its minimum or not finite),
    then restores the model, optimizer, ``scheduler``, ``scaler``, RNG states and the loader's
    sampler generators exactly. Returns an :class:`~lrwatch.recovery.curve.LRCurve`: its
    ``suggestion`` is ``fraction`` x the largest stable rate with the default ``rule``
    (see :func:`lrwatch.recovery.curve.suggest`), plus the whole curve.

    ``loss_fn(model(inputs), targets)`` is called for batches ``(inputs, targets)``; for any
    other batch give ``batch_loss(model, batch) -> loss`` instead. With several parameter
    groups, rates are those of group 0 and the others keep their ratio to it. With a scheduler,
    apply the suggestion by scaling its base rates: ``suggestion / base_lrs[0]``
    (:func:`lrwatch.actions.rollback.scale_learning_rate` does all of them). Under
    ``torch.distributed``, call it on every rank: each rank steps on its own batches, the loss
    is averaged over ``process_group`` at every step, and all ranks stop and suggest together.

    >>> import torch, lrwatch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(256, 8); y = x @ torch.randn(8, 1)
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    >>> model = torch.nn.Linear(8, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> curve = lrwatch.lr_find(model, opt, loader, torch.nn.functional.mse_loss)
    >>> curve.stopped, 0.01 < curve.suggestion < 1.0
    ('diverged', True)
    """
    batch_loss = _batch_loss_of(loss_fn, batch_loss)
    _check_reiterable(loader)
    if not rates_settable(optimizer):
        raise ConfigError(f"lr_find: {NO_RATES}; the range test sets every group's rate (give "
                          f"the optimizer a learning rate, e.g. Adafactor(lr=1e-3, "
                          f"relative_step=False))")
    test = RangeTest(geometric_rates(min_lr, max_lr, num_steps), beta=beta, diverge=diverge,
                     rule=rule, fraction=fraction)
    saved = SavedTraining.capture(model, optimizer, scheduler, scaler, loader)
    try:
        with _own_workers(loader), throwaway_steps(optimizer):
            curve = run_range_test(model, optimizer, _cycle(loader), batch_loss, test,
                                   scaler=scaler, reduce=_dist_mean(process_group),
                                   scheduler=scheduler)
    finally:
        saved.restore(model, optimizer, scheduler, scaler)
    return curve
