"""wrap(): the lazy rule and the freeze API for any torch.optim.Optimizer instance."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from safeopt import _rule
from safeopt._doc import RULE
from safeopt._freeze import FreezeAPI
from safeopt._lazy import LazyOptimizer, add_group, lazy_step, load_state
from safeopt._torch_compat import unhooked

__all__ = ["LazyWrapper", "wrap"]

# Attributes that live on the wrapped optimizer, so that the wrapper and the
# optimizer it wraps are one optimizer: an LR scheduler changing the wrapper's
# lr changes the inner one's, hooks registered on either run once per step, and
# GradScaler's fused-step attributes reach the kernels that read them.
_SHARED = (
    "param_groups",
    "state",
    "defaults",
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "_step_supports_amp_scaling",
    "grad_scale",
    "found_inf",
)


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

    def __init__(self, optimizer: Optimizer, *, strict: bool = False, lazy: bool = True) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"wrap() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (LazyOptimizer, LazyWrapper)):
            raise ValueError(f"the {type(optimizer).__name__} already follows the lazy rule; use it as it is")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure inside step(), after safeopt has decided which "
                "parameters take part; wrap() cannot keep its guarantee for it"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        _rule.check_lazy(lazy)
        for i, group in enumerate(optimizer.param_groups):
            _rule.check_flags(group, len(group["params"]), f"param group {i}")
        super().__init__(optimizer.param_groups, optimizer.defaults)
        for name in _SHARED:
            self.__dict__.pop("_own_" + name, None)
        self.__dict__["_inner"] = optimizer
        self._strict = strict
        self._step = unhooked(type(optimizer).step)
        self.defaults.update({_rule.LAZY: lazy, _rule.FROZEN: False})
        for group in self.param_groups:
            _rule.fill_flags(group, self.defaults)

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer. Stepping it directly bypasses the lazy rule."""
        return self.__dict__["_inner"]  # type: ignore[no-any-return]

    @property
    def strict(self) -> bool:
        """Whether inactive parameters are snapshotted and restored around each step."""
        return self._strict

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer on the active parameters only.

        A closure is evaluated once, before the decision; the wrapped step gets none.
        """
        inner = self.optimizer
        before = (lambda plans: _snapshot_inactive(inner, plans)) if self._strict else None
        return lazy_step(inner, lambda: self._step(inner), closure, before=before)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; also takes ``"frozen"`` and ``"lazy"`` keys."""
        if "_inner" not in self.__dict__:  # Optimizer.__init__ re-adding the wrapped groups
            super().add_param_group(param_group)
        else:
            add_group(self.optimizer, self.optimizer.add_param_group, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict (with safeopt's group keys)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer; freeze flags come back, a torch state_dict loads unfrozen."""
        load_state(self.optimizer, self.optimizer.load_state_dict, state_dict)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rewrap, (self.optimizer, self._strict))

    def __repr__(self) -> str:
        return f"safeopt.wrap({self.optimizer!r}, strict={self._strict})"


for _name in _SHARED:
    setattr(LazyWrapper, _name, _shared(_name))
del _name


def _rewrap(optimizer: Optimizer, strict: bool) -> LazyWrapper:
    return LazyWrapper(optimizer, strict=strict)


def _snapshot_inactive(optimizer: Optimizer, plans: list[_rule.GroupPlan]) -> Callable[[], None]:
    """Copy every inactive parameter, its grad and its state; return the function that puts them back."""
    saved = []
    for group, plan in zip(optimizer.param_groups, plans):
        active = {id(p) for p in plan.active}
        for p in group["params"]:
            if id(p) in active:
                continue
            grad = p.grad
            state = optimizer.state.get(p)
            saved.append(
                (
                    p,
                    p.detach().clone(),
                    grad,
                    None if grad is None else grad.clone(),
                    None
                    if state is None
                    else {k: (v, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()},
                )
            )

    def restore() -> None:
        with torch.no_grad():
            for p, value, grad, grad_value, state in saved:
                _put_back(p, value)
                p.grad = grad
                if grad is not None and grad_value is not None:
                    _put_back(grad, grad_value)
                if state is None:
                    optimizer.state.pop(p, None)
                    continue
                current = optimizer.state[p]
                for key in [k for k in current if k not in state]:
                    del current[key]
                for key, (original, value) in state.items():
                    if isinstance(original, torch.Tensor):
                        _put_back(original, value)
                    current[key] = original

    return restore


def _put_back(tensor: torch.Tensor, value: torch.Tensor) -> None:
    # Writing only what changed keeps autograd's version counter of untouched tensors as it was.
    if not torch.equal(tensor, value) or tensor.dtype != value.dtype or tensor.shape != value.shape:
        tensor.copy_(value)


def wrap(optimizer: Optimizer, *, strict: bool = False, lazy: bool = True) -> LazyWrapper:
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

    Closures are evaluated once, before the decision; LBFGS, which re-evaluates
    its closure inside ``step()``, is refused.

    """
    return LazyWrapper(optimizer, strict=strict, lazy=lazy)


wrap.__doc__ = inspect.cleandoc(wrap.__doc__ or "") + "\n\n" + RULE
