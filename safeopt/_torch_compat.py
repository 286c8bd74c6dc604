"""The two places where safeopt leans on torch.optim internals.

Everything else in safeopt uses public API only. Both seams are small and are
checked by ``tests/test_torch_compat.py``; each falls back to documented
behaviour when a torch release changes it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["allocate_state", "unhooked"]


def unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``step`` without the hook wrapper that ``Optimizer.__init__`` installs.

    torch wraps ``type(optimizer).step`` once per class so that step pre/post hooks
    (the optimizer's own and the global ones) run around it. A safeopt optimizer's
    ``step`` already carries that wrapper, so calling torch's wrapped ``step`` from
    inside it would run every hook twice. torch marks the wrapper with ``hooked``,
    and ``functools.wraps`` keeps the original under ``__wrapped__``.
    """
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined,no-any-return]
    return step


@functools.cache
def _init_group_arity(cls: type) -> int | None:
    """How many output lists ``cls._init_group(self, group, ...)`` takes, or None."""
    init = getattr(cls, "_init_group", None)
    if init is None:
        return None
    try:
        outputs = list(inspect.signature(init).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    if not all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in outputs):
        return None
    return len(outputs)


def allocate_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]
) -> None:
    """Allocate state for ``params`` (each with a grad) exactly as torch would, without a step.

    Every built-in torch optimizer creates its state lazily inside
    ``_init_group(group, <output lists>)``, which only gathers lists and creates
    missing state (zeros, step 0). Running it on a copy of the group that holds
    just ``params`` gives torch's tensors, dtypes and devices, and torch's own
    errors (a sparse grad for Adam, the fused device check). An optimizer without
    a compatible ``_init_group`` keeps no state for an idle parameter until its
    first real update.
    """
    arity = _init_group_arity(type(optimizer))
    if not params or arity is None:
        return
    view = dict(group)
    view["params"] = params
    with torch.no_grad():
        type(optimizer)._init_group(optimizer, view, *([] for _ in range(arity)))  # type: ignore[attr-defined]
