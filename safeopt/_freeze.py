"""Freezing: the lazy rule applied to a whole group or to chosen parameters.

Flags live in the param groups themselves (``frozen``, ``frozen_params``), so
they travel in ``state_dict()`` and an LR scheduler or a torch class never has
to know about them. Lists are always replaced, never mutated, so a state_dict
taken earlier does not change under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from safeopt._rule import FROZEN, FROZEN_PARAMS, frozen_params

__all__ = ["FreezeAPI", "Target"]

#: What freeze(), unfreeze(), is_frozen() and frozen() accept.
Target = int | str | dict[str, Any] | Tensor | nn.Module | Iterable[Tensor]


class _Selection(NamedTuple):
    groups: list[int]  # indices of whole groups
    params: list[tuple[int, int]]  # (group index, position in group["params"])


def _describe(t: Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}"


def _select(param_groups: Sequence[dict[str, Any]], target: Any) -> _Selection:
    if isinstance(target, bool):
        raise TypeError(f"freeze target must be a group index, not a bool: {target!r}")
    if isinstance(target, int):
        try:
            param_groups[target]
        except IndexError:
            raise IndexError(
                f"param group index {target} is out of range: the optimizer has "
                f"{len(param_groups)} param group(s)"
            ) from None
        return _Selection([target % len(param_groups)], [])
    if isinstance(target, dict):
        for i, group in enumerate(param_groups):
            if group is target:
                return _Selection([i], [])
        raise ValueError(
            "the param group dict is not one of this optimizer's param_groups (groups are "
            "matched by identity: pass optimizer.param_groups[i], its index, or its name)"
        )
    if isinstance(target, str):
        found = [i for i, g in enumerate(param_groups) if g.get("name") == target]
        if not found:
            names = [g["name"] for g in param_groups if "name" in g]
            raise KeyError(
                f"no param group is named {target!r}; named groups: {names or 'none'} "
                f"(give a group a name with {{'params': ..., 'name': {target!r}}})"
            )
        return _Selection(found, [])

    # Every position of each parameter: torch only warns when a group holds one twice.
    where: dict[int, list[tuple[int, int]]] = {}
    for gi, g in enumerate(param_groups):
        for pos, p in enumerate(g["params"]):
            where.setdefault(id(p), []).append((gi, pos))
    if isinstance(target, Tensor):
        if id(target) not in where:
            raise ValueError(f"the {_describe(target)} is not held by this optimizer")
        return _Selection([], where[id(target)])
    if isinstance(target, nn.Module):
        held = [at for p in target.parameters() for at in where.get(id(p), [])]
        if not held:
            raise ValueError(
                f"none of the parameters of the module {type(target).__name__} (id {id(target):#x}, "
                f"{sum(1 for _ in target.parameters())} parameter(s)) is held by this optimizer; pass a "
                "module whose parameters the optimizer was built with (or add them with add_param_group())"
            )
        return _Selection([], held)
    if isinstance(target, Iterable):
        tensors = list(target)
        if not tensors:
            raise ValueError("the iterable of parameters to freeze is empty")
        selected = []
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(f"expected an iterable of parameters, found {type(t).__name__}: {t!r}")
            if id(t) not in where:
                raise ValueError(f"the {_describe(t)} is not held by this optimizer")
            selected.extend(where[id(t)])
        return _Selection([], selected)
    raise TypeError(
        f"cannot freeze a {type(target).__name__}: pass a param group (index, dict or name), "
        "a Parameter, an nn.Module or an iterable of parameters"
    )


def _set(param_groups: Sequence[dict[str, Any]], selection: _Selection, value: bool) -> None:
    for gi in selection.groups:
        param_groups[gi][FROZEN] = value
    by_group: dict[int, set[int]] = {}
    for gi, pos in selection.params:
        by_group.setdefault(gi, set()).add(pos)
    for gi, positions in by_group.items():
        current = set(param_groups[gi].get(FROZEN_PARAMS, ()))
        current = current | positions if value else current - positions
        param_groups[gi][FROZEN_PARAMS] = sorted(current)


# A group added behind safeopt's back (torch's add_param_group or load_state_dict) may lack the
# flags: it is read as frozen=False, frozen_params=[].
def _group_frozen(group: dict[str, Any]) -> bool:
    return bool(group.get(FROZEN, False))


def _param_frozen(group: dict[str, Any], pos: int) -> bool:
    """Whether the parameter at ``pos`` is frozen: by its group, or at any position it holds in
    the group (a parameter held twice is one parameter; ``plan_step`` decides the same way)."""
    return _group_frozen(group) or id(group["params"][pos]) in frozen_params(group)


class FreezeAPI:
    """freeze / unfreeze / is_frozen / frozen for a class with ``param_groups``.

    A parameter is frozen when its group is frozen or it was frozen itself; the
    two flags are independent. A frozen parameter is inactive: it, its grad and
    its state stay bit-identical in every step.
    """

    param_groups: list[dict[str, Any]]

    def freeze(self, target: Target) -> None:
        """Freeze ``target``: a param group (index, dict or ``"name"``), a Parameter,
        an ``nn.Module`` (its parameters this optimizer holds) or an iterable of parameters.

        Raises IndexError, KeyError, ValueError or TypeError naming the target when
        the optimizer does not hold it; nothing changes then.
        """
        _set(self.param_groups, _select(self.param_groups, target), True)

    def unfreeze(self, target: Target) -> None:
        """Undo :meth:`freeze` for ``target`` (same targets).

        Unfreezing a parameter whose whole group is frozen raises ValueError:
        unfreeze the group instead, or freeze its parameters one by one.
        """
        selection = _select(self.param_groups, target)
        for gi, _ in selection.params:
            if _group_frozen(self.param_groups[gi]):
                raise ValueError(
                    f"cannot unfreeze a parameter of param group {gi}: the whole group is "
                    f"frozen; call unfreeze({gi}) for the group, or freeze its parameters one by one"
                )
        _set(self.param_groups, selection, False)

    def is_frozen(self, target: Target) -> bool:
        """True when every parameter named by ``target`` is frozen, by its group or itself.

        A group is frozen when it was frozen as a whole, or when it holds parameters and each of
        them is frozen; an empty group only in the first case. A parameter held at several
        positions of its group is frozen and unfrozen at all of them together.
        """
        selection = _select(self.param_groups, target)
        groups = self.param_groups
        # A group is frozen by its flag; one with parameters also when each of them is frozen
        # (an empty group was frozen only if its flag says so).
        return all(
            _group_frozen(groups[gi])
            or (
                bool(groups[gi]["params"])
                and all(_param_frozen(groups[gi], pos) for pos in range(len(groups[gi]["params"])))
            )
            for gi in selection.groups
        ) and all(_param_frozen(groups[gi], pos) for gi, pos in selection.params)

    @contextlib.contextmanager
    def frozen(self, target: Target) -> Iterator[None]:
        """Freeze ``target`` inside a ``with`` block; its previous flags come back on exit."""
        selection = _select(self.param_groups, target)
        touched = set(selection.groups) | {gi for gi, _ in selection.params}
        saved = {
            gi: (_group_frozen(self.param_groups[gi]), self.param_groups[gi].get(FROZEN_PARAMS, []))
            for gi in touched
        }
        _set(self.param_groups, selection, True)
        try:
            yield
        finally:
            for gi, (group_flag, positions) in saved.items():
                group = self.param_groups[gi]
                if gi in selection.groups:
                    group[FROZEN] = group_flag
                if any(g == gi for g, _ in selection.params):
                    mine = {pos for g, pos in selection.params if g == gi}
                    now = set(group.get(FROZEN_PARAMS, ())) - mine
                    group[FROZEN_PARAMS] = sorted(now | (mine & set(positions)))
