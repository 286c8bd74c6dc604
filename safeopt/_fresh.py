"""Fresh state: what safeopt keeps for an idle parameter that has a grad, before its first update.

torch's step gives every parameter with a grad its state, zero grads included, and
``torch.distributed.checkpoint`` relies on that: ``get_state_dict`` materialises a new optimizer's
state by one step on zero grads, and ``dcp.load`` fills only the keys that state has. So safeopt
gives an idle parameter with a grad the state torch's ``_init_group`` makes for it, marked
:class:`Fresh`, and no update touches it. Nothing of it may show in the parameter's first update,
which is torch's first step with the settings of that moment (the learning rate that Rprop and
ASGD copy into their state, ``amsgrad`` switched on meanwhile): at that update the fresh state is
dropped and torch makes it again (:func:`prepare`).

In a state_dict (safeopt's ``state_dict()``) fresh state is a plain dict; torch's SGD, which makes
its momentum buffer in the update itself, gets zeros in its place (what torch's step on a zero
grad makes), and each param group with momentum lists the positions of such placeholders under
``"fresh_params"``. A load marks fresh again what was fresh (:func:`loaded`): state with ``step``
0 of torch's optimizers that count from 1 at a parameter's first update, and the listed SGD
placeholders.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from safeopt import _rows
from safeopt._rule import GroupPlan
from safeopt._torch_compat import MOMENTUM_BUFFER, STEP, state_made_at_first_step, untraced

__all__ = [
    "FRESH_PARAMS",
    "Fresh",
    "amsgrad_unstarted",
    "drop_unstarted",
    "loaded",
    "prepare",
    "remark",
    "saved",
    "undo",
]

FRESH_PARAMS = "fresh_params"  # in a state_dict's SGD groups: positions whose buffer is a placeholder
MAX_EXP_AVG_SQ = "max_exp_avg_sq"  # Adam's and AdamW's, made with the state when amsgrad is on


class Fresh(dict):  # type: ignore[type-arg]  # torch's per-parameter state: str keys, any values
    """A parameter's state as torch allocated it, no update having used it yet.

    Copies and pickles (``torch.save`` of a state_dict taken from torch's own method) as an
    ``OrderedDict``, a type ``torch.load(weights_only=True)`` accepts; ``deepcopy`` keeps the mark.
    """

    __slots__ = ()

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (collections.OrderedDict, (), None, None, iter(self.items()))

    def __deepcopy__(self, memo: dict[int, Any]) -> Fresh:
        return Fresh(copy.deepcopy(dict(self), memo))


Dropped = list[tuple[torch.Tensor, "Fresh"]]


def prepare(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]], plans: Sequence[GroupPlan]
) -> Dropped:
    """Before a step: fresh state for the idle parameters with a grad that have none, and no fresh
    state for the parameters this step updates (torch makes it at their first update). Returns
    what it dropped, for :func:`undo` when the step fails."""
    state = optimizer.state
    # One walk over the state by items (no tensor hashed) finds the fresh entries; most steps have
    # none among the parameters they update.
    fresh = {id(p) for p, entry in state.items() if type(entry) is Fresh}
    amsgrad = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and any(
        g.get("amsgrad") for g in groups
    )
    unmarked = _unmarked(state) if amsgrad else set()
    dropped: Dropped = []
    for group, plan in zip(groups, plans):
        if unmarked and group.get("amsgrad"):
            # Read from the device only for these: updated now, amsgrad on, no max_exp_avg_sq.
            fresh |= {id(p) for p in _stepped(plan) if id(p) in unmarked and _initial(state.get(p, {}))}
        if fresh:
            for p in _stepped(plan):
                if id(p) in fresh:
                    fresh.discard(id(p))  # a parameter held twice is dropped once
                    dropped.append((p, state[p]))
                    state[p] = {}  # torch makes it anew; the key stays (another thread may iterate)
        if plan.idle_with_grad:
            _allocate(optimizer, group, [p for p in plan.idle_with_grad if not state.get(p)])
    return dropped


def _unmarked(state: Any) -> set[int]:
    """The ids of the parameters whose state is neither marked :class:`Fresh` nor has
    ``max_exp_avg_sq``: in a group with ``amsgrad`` on, state made before it was switched on, as a
    compiled step makes it for an idle parameter (``safeopt/_compiled.py`` selects on the device,
    and cannot mark it). One walk by items, as for the fresh entries: no tensor hashed, nothing
    read from the device."""
    return {
        id(p)
        for p, entry in state.items()
        if entry and type(entry) is not Fresh and MAX_EXP_AVG_SQ not in entry
    }


@untraced  # host reads, rare (amsgrad switched on since the state was made): no graph guarded on them
def _initial(entry: dict[str, Any]) -> bool:
    """Whether ``entry`` (a parameter updated in this step, in a group with ``amsgrad`` on, no
    ``max_exp_avg_sq``) is torch's initial state: ``step`` 0 and zero moments. Only then is
    dropping it and letting torch make it anew the same bits as torch's state for a new parameter
    (what torch's class holding only the active parameters has); any other state stays, and
    torch's ``_init_group`` raises its ``KeyError`` on it as it does. A user's own state of that
    form is made anew too, where torch raises (docs/integrations.md)."""
    step = entry.get(STEP)
    if step is None or not all(isinstance(entry.get(key), torch.Tensor) for key in ("exp_avg", "exp_avg_sq")):
        return False
    return float(step) == 0 and not _used(entry)


def drop_unstarted(
    optimizer: torch.optim.Optimizer,
    groups: Sequence[dict[str, Any]],
    stepped: Sequence[Sequence[torch.Tensor]],
    *,
    capturing: bool,
) -> Dropped:
    """Before a capturable step (``stepped``: the parameters of each group in torch's step), in a
    group with ``amsgrad`` on: drop the state without ``max_exp_avg_sq`` that no update used, made
    by an earlier capturable step where the parameter was idle (torch's kernel made it and skipped
    it) or marked :class:`Fresh`, so that torch makes it anew, amsgrad included, as for a new
    parameter. Other state stays, for torch's ``KeyError``. Only a dict check per parameter in
    such groups; a host read only for the rare state without ``max_exp_avg_sq``, and none under
    capture, which raises instead. Returns what it dropped, for :func:`undo`."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return []
    state = optimizer.state
    dropped: Dropped = []
    for group, params in zip(groups, stepped):
        if not group.get("amsgrad"):
            continue
        for p in params:
            entry = state.get(p)
            if not entry or MAX_EXP_AVG_SQ in entry:
                continue
            if capturing:
                raise RuntimeError(
                    "safeopt cannot capture this step in a CUDA graph: a parameter of a param group with "
                    "amsgrad=True has state made before amsgrad was switched on (no max_exp_avg_sq); "
                    "take one step outside capture first"
                )
            if type(entry) is Fresh or _initial(entry):
                dropped.append((p, entry))
                state[p] = {}
    return dropped


@untraced  # reads the state: traced, dynamo would guard on its keys and compile again when it appears
def amsgrad_unstarted(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether a parameter with a grad in ``group`` (amsgrad on) has state without
    ``max_exp_avg_sq``: state made before ``amsgrad`` was switched on. The compiled path leaves
    such a step to the host (:func:`prepare` drops it where no update used it)."""
    state = optimizer.state
    return any(
        p.grad is not None and (entry := state.get(p)) and MAX_EXP_AVG_SQ not in entry
        for p in group["params"]
    )


def undo(optimizer: torch.optim.Optimizer, dropped: Dropped) -> None:
    """Put back the fresh state ``prepare`` dropped, when the step failed before torch made the
    parameter's state anew. Where torch's step did (it updates groups one after another and can
    fail on a later one), its state stays with the update it goes with."""
    for p, entry in dropped:
        if not optimizer.state.get(p):
            optimizer.state[p] = entry


def _stepped(plan: GroupPlan) -> Iterator[torch.Tensor]:
    yield from plan.active
    for p, _, _ in plan.rows:
        yield p


def _allocate(optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]) -> None:
    """torch's state for ``params``, marked fresh. A parameter whose state torch refuses to make (a
    sparse grad for Adam, a complex parameter for fused Adam) gets none: it is idle, and such a
    grad may not make the step fail; if it becomes active, torch's step raises its own error."""
    if not params:
        return
    state = optimizer.state
    try:
        _rows.allocate_state(optimizer, group, params)
    except (RuntimeError, TypeError, ValueError):  # one by one, leaving out the ones torch refuses
        for p in params:
            state.pop(p, None)
        for p in params:
            try:
                _rows.allocate_state(optimizer, group, [p])
            except (RuntimeError, TypeError, ValueError):
                state.pop(p, None)
    for p in params:
        made = state.get(p)
        if made is not None and type(made) is not Fresh:
            state[p] = Fresh(made)


def saved(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's ``state_dict()`` of ``optimizer``) with fresh state as plain dicts
    and, for SGD with momentum, placeholders listed in ``"fresh_params"`` of every such group (an
    empty list too: a DCP load target must have the keys its checkpoint has)."""
    states = state_dict.get("state")
    if not isinstance(states, dict):  # a state_dict of another shape (torch-optimizer's Lookahead)
        return state_dict
    sgd = isinstance(optimizer, torch.optim.SGD)
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        placeholders = sgd and group.get("momentum", 0) != 0
        fresh = []
        for position, (key, p) in enumerate(zip(saved_group["params"], group["params"])):
            entry = states.get(key)
            if entry is None:
                continue
            if placeholders and MOMENTUM_BUFFER not in entry:
                states[key] = {
                    **entry,
                    MOMENTUM_BUFFER: torch.zeros_like(p, memory_format=torch.preserve_format).detach(),
                }
                fresh.append(position)
            elif type(entry) is Fresh:
                states[key] = dict(entry)
        if placeholders:
            saved_group[FRESH_PARAMS] = fresh
    return state_dict


def loaded(optimizer: torch.optim.Optimizer, had_state: set[int]) -> None:
    """After torch's ``load_state_dict``: mark fresh what the loaded state_dict held fresh.

    Fresh state loaded into a parameter that had no state is dropped instead (safeopt makes it
    again when it is idle with a grad): torch's load casts its scalars (NAdam's ``mu_product``,
    ASGD's ``eta``) to the parameter's dtype, which fresh state made by safeopt never has. A
    placeholder SGD buffer that is not all zeros (torch stepped the state_dict meanwhile) is a
    real buffer.
    """
    state = optimizer.state
    counts_from_one = state_made_at_first_step(optimizer)
    for group in optimizer.param_groups:
        fresh = set(group.pop(FRESH_PARAMS, None) or ())
        for position, p in enumerate(group["params"]):
            entry = state.get(p)
            if not entry:
                continue
            if position in fresh and MOMENTUM_BUFFER in entry and not _any(entry[MOMENTUM_BUFFER]):
                state[p] = Fresh({k: v for k, v in entry.items() if k != MOMENTUM_BUFFER})
            elif STEP in entry and float(entry[STEP]) == 0 and not _used(entry):
                if id(p) not in had_state:
                    del state[p]
                elif counts_from_one:
                    state[p] = Fresh(entry)


# State torch's _init_group fills from the settings rather than with zeros: NAdam's mu_product (1),
# ASGD's eta (lr) and mu (1), Rprop's step_size (lr).
_SETTINGS = frozenset({STEP, "mu_product", "eta", "mu", "step_size"})


def _used(entry: dict[str, Any]) -> bool:
    """Whether state with ``step`` 0 holds what no initial state does: a nonzero moment or buffer.
    Such state was used and its count set back (a warm restart of the bias correction): it is kept
    as it is, as torch keeps it, not dropped as fresh."""
    return any(
        isinstance(value, torch.Tensor) and key not in _SETTINGS and value.numel() and _any(value)
        for key, value in entry.items()
    )


def remark(optimizer: torch.optim.Optimizer) -> None:
    """Mark fresh state again after unpickling (which makes every state entry a plain dict)."""
    loaded(optimizer, {id(p) for group in optimizer.param_groups for p in group["params"]})


def _any(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a nonzero; of a DTensor, its local shard (no collective)."""
    local = getattr(t, "to_local", None)
    return bool((local() if callable(local) else t).any())
