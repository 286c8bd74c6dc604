"""wrap(): the lazy rule and the freeze API for any torch.optim.Optimizer instance."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from safeopt import _fresh, _rows, _rule
from safeopt._doc import RULE
from safeopt._freeze import FreezeAPI
from safeopt._lazy import LazyOptimizer, add_group, give_back, lazy_step, load_state
from safeopt._torch_compat import HOOK_DICTS, INSTANCE_ATTRS, unhooked

__all__ = ["LazyWrapper", "wrap"]

# What Optimizer.__init__ sets on an instance; an optimizer without them never called it.
_SET_BY_INIT = ("param_groups", "state", "defaults", HOOK_DICTS[0])

# The wrapper and the optimizer it wraps are one optimizer: an LR scheduler changing the
# wrapper's lr changes the inner one's, hooks registered on either run once per step, and
# GradScaler's fused-step attributes reach the kernels that read them.
_SHARED = INSTANCE_ATTRS


def _shared(name: str) -> property:
    # Optimizer.__init__ assigns some of these before the wrapped optimizer is
    # known; those assignments stay on the wrapper and are dropped afterwards.
    def get(self: LazyWrapper) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:
            try:
                return self.__dict__["_own_" + name]
            except KeyError:
                raise AttributeError(name) from None
        return getattr(inner, name)

    def set_(self: LazyWrapper, value: Any) -> None:
        inner = self.__dict__.get("_inner")
        if inner is None:
            self.__dict__["_own_" + name] = value
        else:
            setattr(inner, name, value)

    def del_(self: LazyWrapper) -> None:
        delattr(self.__dict__["_inner"], name)

    return property(get, set_, del_)


class LazyWrapper(FreezeAPI, Optimizer):
    """A torch optimizer seen through the lazy rule; made by :func:`wrap`."""

    def __init__(self, optimizer: Optimizer, *, strict: bool = False, lazy: _rule.Lazy = True) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"wrap() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (LazyOptimizer, LazyWrapper)):
            raise ValueError(f"the {type(optimizer).__name__} already follows the lazy rule; use it as it is")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure inside step(), after safeopt has decided which "
                "parameters take part; wrap() cannot keep its guarantee for it"
            )
        missing = [name for name in _SET_BY_INIT if name not in vars(optimizer)]
        around = bool(missing) and _around_another(optimizer)
        if missing and not around:
            raise ValueError(
                f"the {type(optimizer).__name__} subclasses torch.optim.Optimizer without calling "
                f"Optimizer.__init__ (it has no {', '.join(missing)}) nor shares the groups of an optimizer "
                f"it holds as .optimizer (as Lookahead does); wrap() cannot share its groups, state and "
                f"hooks. Wrap the "
                f"optimizer inside it instead: {type(optimizer).__name__}(safeopt.wrap(inner), ...)"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        if around:
            # Its sync (Lookahead: fast * alpha + slow * (1 - alpha), every k steps) moves every
            # parameter it holds, grad or not: only the snapshot keeps the inactive ones exact. The
            # hook dicts Optimizer.__init__ would have made are made, empty, so that hooks and
            # torch's state_dict() work on it.
            strict = True
            for name in HOOK_DICTS:
                if not hasattr(optimizer, name):
                    setattr(optimizer, name, OrderedDict())
        _rule.check_lazy(lazy)
        for i, group in enumerate(optimizer.param_groups):
            _rule.check_flags(group, len(group["params"]), f"param group {i}")
        _no_rows(
            optimizer,
            [{**group, _rule.LAZY: group.get(_rule.LAZY, lazy)} for group in optimizer.param_groups],
        )
        super().__init__(optimizer.param_groups, optimizer.defaults)
        for name in _SHARED:
            self.__dict__.pop("_own_" + name, None)
        self.__dict__["_inner"] = optimizer
        self._strict = strict
        self._around = around
        self._step = unhooked(type(optimizer).step)
        # torch's own optimizers evaluate a closure before reading any grad: safeopt does that for
        # them, once, before the decision. Others (SAM) may need it inside their step.
        self._own_closure = type(optimizer).step.__module__.startswith("torch.optim")
        self.defaults.update({_rule.LAZY: lazy, _rule.FROZEN: False})
        for group in self.param_groups:
            _rule.fill_flags(group, self.defaults)

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer. Stepping it directly bypasses the lazy rule."""
        return self.__dict__["_inner"]  # type: ignore[no-any-return]  # set by wrap() to the wrapped Optimizer

    @property
    def strict(self) -> bool:
        """Whether inactive parameters are snapshotted and restored around each step."""
        return self._strict

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]  # keyword-compatible with Optimizer.step
        """Step the wrapped optimizer on the active parameters only.

        The grad of every inactive parameter is None for the call; ``group["params"]`` is left
        as it is. A closure goes to the wrapped step as described in :func:`wrap`.
        """
        inner = self.optimizer
        # Around another optimizer: the inner one's state is snapshotted too (Lookahead keeps
        # the slow copies, the optimizer inside it the rest).
        holders = [inner, vars(inner)["optimizer"]] if self._around else [inner]
        before = (lambda plans: _snapshot_inactive(holders, plans)) if self._strict else None
        if self._own_closure:
            return lazy_step(inner, self._step, closure, before=before, hide="grads")
        return lazy_step(inner, self._step, closure, before=before, hide="grads", pass_closure=True)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the wrapped optimizer's public methods and
        # attributes (schedule-free's train() and eval(), a scheduler's extra fields).
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; also takes ``"frozen"`` and ``"lazy"`` keys."""
        if "_inner" not in self.__dict__:  # Optimizer.__init__ re-adding the wrapped groups
            super().add_param_group(param_group)
        else:
            _no_rows(self.optimizer, [{_rule.LAZY: self.defaults[_rule.LAZY], **param_group}])
            add_group(self.optimizer, self.optimizer.add_param_group, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict (with safeopt's group keys)."""
        return _fresh.saved(self.optimizer, self.optimizer.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer; freeze flags come back, a torch state_dict loads unfrozen."""
        _no_rows(self.optimizer, state_dict.get("param_groups", []))
        load_state(self.optimizer, self.optimizer.load_state_dict, state_dict)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rewrap, (self.optimizer, self._strict, self.defaults[_rule.LAZY]))

    def __repr__(self) -> str:
        return f"safeopt.wrap({self.optimizer!r}, strict={self._strict}, lazy={self.defaults[_rule.LAZY]!r})"


for _name in _SHARED:
    setattr(LazyWrapper, _name, _shared(_name))
del _name


def _rewrap(optimizer: Optimizer, strict: bool, lazy: _rule.Lazy = True) -> LazyWrapper:
    _fresh.remark(optimizer)  # unpickled: fresh state came back as plain dicts
    return LazyWrapper(optimizer, strict=strict, lazy=lazy)


def _no_rows(optimizer: Optimizer, groups: list[dict[str, Any]]) -> None:
    """Refuse ``lazy="rows"`` when the wrapper is made or given a group, not at the first step."""
    _rows.check(optimizer, groups, twin=False)


def _around_another(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is one around another that shares its groups (Lookahead): it skipped
    Optimizer.__init__ but has groups, state and defaults."""
    inner = vars(optimizer).get("optimizer")
    return (
        isinstance(inner, Optimizer)
        and all(hasattr(optimizer, name) for name in ("param_groups", "state", "defaults"))
        and optimizer.param_groups is inner.param_groups
    )


def _snapshot_inactive(holders: list[Optimizer], plans: list[_rule.GroupPlan]) -> Callable[[], None]:
    """Copy every inactive parameter, its grad and its state in each of ``holders`` (whose groups
    are the first one's); return the function that puts them back."""
    saved = []
    for group, plan in zip(holders[0].param_groups, plans):
        active = {id(p) for p in plan.active}
        for p in group["params"]:
            if id(p) in active:
                continue
            grad = p.grad
            states = [
                None
                if state is None
                else {k: (v, _copy(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
                for state in (holder.state.get(p) for holder in holders)
            ]
            saved.append((p, _copy(p.detach()), grad, None if grad is None else _copy(grad), states))

    def restore() -> None:
        with torch.no_grad():
            for p, value, grad, grad_value, states in saved:
                _put_back(p.detach(), value)
                if grad is not None and grad_value is not None:
                    _put_back(grad, grad_value)
                for holder, state in zip(holders, states):
                    _put_back_state(holder, p, state)
            give_back([(p, grad) for p, _, grad, _, _ in saved])

    return restore


def _put_back_state(optimizer: Optimizer, p: torch.Tensor, state: dict[str, Any] | None) -> None:
    if state is None:
        optimizer.state.pop(p, None)
        return
    current = optimizer.state[p]
    for key in [k for k in current if k not in state]:
        del current[key]
    for key, (original, value) in state.items():
        if isinstance(original, torch.Tensor):
            _put_back(original, value)
        current[key] = original


# A copy of a tensor's value. A tensor subclass that wraps plain tensors (torchao's quantized
# optimizer state: codes and scales) may support neither clone() nor torch.equal; its inner
# tensors, which __tensor_flatten__ names, are copied instead.
_Copy = torch.Tensor | dict[str, Any]


def _copy(tensor: torch.Tensor) -> _Copy:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return {name: _copy(getattr(tensor, name)) for name in names}
    return tensor.clone()


def _put_back(tensor: torch.Tensor, value: _Copy) -> None:
    if isinstance(value, dict):
        for name, inner in value.items():
            _put_back(getattr(tensor, name), inner)
        return
    if tensor.layout is not torch.strided:  # sparse: torch.equal does not take it
        tensor.copy_(value)
        return
    # Writing only what changed keeps autograd's version counter of untouched tensors as it was.
    if not torch.equal(tensor, value) or tensor.dtype != value.dtype or tensor.shape != value.shape:
        tensor.copy_(value)


def wrap(optimizer: Optimizer, *, strict: bool = False, lazy: _rule.Lazy = True) -> LazyWrapper:
    """Give any ``torch.optim.Optimizer`` instance the lazy rule and the freeze API.

    The result is a :class:`torch.optim.Optimizer` that shares ``param_groups``,
    ``state``, ``defaults`` and hooks with ``optimizer``, so LR schedulers,
    ``state_dict()`` and ``GradScaler`` work on it; step the result, not
    ``optimizer``. The wrapped step sees only the active parameters in
    ``group["params"]``. That is enough for every ``torch.optim`` optimizer.

    ``strict=True`` also protects inactive parameters from an optimizer that
    reaches them another way (a cached parameter list, a flat buffer, decay of
    every parameter): each step copies every inactive parameter, its grad and its
    state before the wrapped step and writes back whatever changed after it.
    That costs a copy of the inactive parameters and their state in memory and a
    read and compare of both in time, every step.

    An optimizer around another one that shares its groups (torch-optimizer's
    ``Lookahead``, which syncs every parameter it holds every k steps) is
    always wrapped with ``strict=True``; its inner optimizer's state is
    snapshotted too.

    Closures are evaluated once, before the decision; LBFGS, which re-evaluates
    its closure inside ``step()``, is refused.

    """
    return LazyWrapper(optimizer, strict=strict, lazy=lazy)


wrap.__doc__ = inspect.cleandoc(wrap.__doc__ or "") + "\n\n" + RULE
