"""safeopt.audit: what a model and an optimizer disagree about, by parameter name.

Read-only: it looks at ``model.named_parameters()`` and ``optimizer.param_groups`` and changes
neither. Parameters are matched by identity, as the optimizer matches them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from torch import Tensor, nn
from torch.optim import Optimizer

from safeopt._groups import row_tables
from safeopt._lazy import LazyOptimizer
from safeopt._row_rule import ROWS
from safeopt._watch import param_names

__all__ = ["AuditReport", "Finding", "audit"]

#: Finding kinds, in the order the report lists them, with what each means.
KINDS = {
    "not_in_optimizer": "trainable parameters the optimizer does not hold: they never train",
    "replaced": "parameters replaced after the optimizer was built: it still steps the old tensor",
    "not_in_model": "optimizer parameters that are no longer in the model: stepped for nothing",
    "requires_grad_false": (
        "held by the optimizer with requires_grad=False: no new grads; a grad left over from "
        "before (zero_grad(set_to_none=False)) is still stepped by torch.optim"
    ),
    "held_twice": "held more than once by the optimizer: each step updates them more than once",
    "shared": "one parameter under several names (tied weights?): it is stepped and frozen as one",
    "rows_not_lazy": (
        'fused experts or embedding tables in a group without lazy="rows": an expert or row that '
        "got no tokens still has a gradient (all zero in its slice), and the optimizer moves it; "
        'safeopt.AdamW(safeopt.groups(model, ...)) puts them in a lazy="rows" group'
    ),
}


class Finding(NamedTuple):
    """One thing :func:`audit` found."""

    kind: str  # a key of KINDS
    names: tuple[str, ...]  # the parameter's name(s) in the model, or where the optimizer holds it
    detail: str  # shape, place in the optimizer


class AuditReport:
    """What :func:`audit` found. Falsy when nothing is wrong; ``str()`` names every finding.

    Attributes:
        findings: Every finding, grouped by kind: a ``Finding`` with ``kind`` (one of
            ``"not_in_optimizer"``, ``"replaced"``, ``"not_in_model"``,
            ``"requires_grad_false"``, ``"held_twice"``, ``"shared"``, ``"rows_not_lazy"``),
            ``names`` (the
            parameter's names in the model, or where the optimizer holds it) and ``detail``.
    """

    def __init__(self, findings: list[Finding], n_model: int, n_optimizer: int) -> None:
        self.findings = findings
        self._counts = (n_model, n_optimizer)

    def kinds(self) -> set[str]:
        """The kinds of finding present."""
        return {f.kind for f in self.findings}

    def __bool__(self) -> bool:
        return bool(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __str__(self) -> str:
        n_model, n_optimizer = self._counts
        head = f"audit: {n_model} trainable parameter(s) in the model, {n_optimizer} held by the optimizer"
        if not self.findings:
            return head + ": no findings"
        lines = [f"{head}: {len(self.findings)} finding(s)"]
        by_kind: dict[str, list[Finding]] = defaultdict(list)
        for f in self.findings:
            by_kind[f.kind].append(f)
        for kind, found in by_kind.items():
            lines += ["", f"{KINDS[kind]}:"]
            lines += [f"  {' = '.join(f.names)}  ({f.detail})" for f in found]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<AuditReport: {len(self.findings)} finding(s): {sorted(self.kinds())}>"


def _shape(p: Tensor) -> str:
    return "shape " + ("x".join(map(str, p.shape)) or "scalar")


def audit(model: nn.Module, optimizer: Optimizer) -> AuditReport:
    """Compare ``model``'s parameters with what ``optimizer`` holds and report, by name:

    - trainable parameters (``requires_grad=True``) the optimizer does not hold: a module or
      adapter added after the optimizer was built, a group left out;
    - parameters replaced after the optimizer was built (``layer.weight = nn.Parameter(...)``):
      named when the optimizer knows the old one's name (built from ``named_parameters()``) or
      the new one has the same shape as a parameter the optimizer holds that the model lost;
    - optimizer parameters no longer in the model;
    - parameters the optimizer holds with ``requires_grad=False``;
    - parameters the optimizer holds more than once;
    - one parameter under several names in the model (tied weights);
    - fused expert parameters (``[E, ...]``) and untied embedding tables in a group without
      ``lazy="rows"`` (``safeopt.groups``' ``rows="auto"`` rule says which): there the optimizer
      decides per tensor, and an expert or row that got no tokens is moved.

    Works with any ``torch.optim.Optimizer``; changes nothing. The report is falsy when there is
    no finding, and ``str(report)`` lists each finding with the parameter names.

    Example:
        ```python
        report = safeopt.audit(model, optimizer)
        if report:
            print(report)
        ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit() takes an nn.Module first, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"audit() takes a torch.optim.Optimizer second, got {type(optimizer).__name__}")

    model_names: dict[int, list[str]] = defaultdict(list)
    model_params: dict[int, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        model_names[id(p)].append(name)
        model_params[id(p)] = p

    held: dict[int, list[tuple[int, int]]] = defaultdict(list)  # id -> (group, position)
    held_params: dict[int, Tensor] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            held[id(p)].append((gi, i))
            held_params[id(p)] = p
    names = param_names(model, optimizer)  # the optimizer's own names for what the model lost

    def where(pid: int) -> str:
        gi, i = held[pid][0]
        group = optimizer.param_groups[gi]
        label = f"group {group['name']!r}" if isinstance(group.get("name"), str) else f"group {gi}"
        return f"{label}, position {i}"

    missing = [pid for pid, p in model_params.items() if p.requires_grad and pid not in held]
    orphans = [pid for pid in held if pid not in model_params]

    # A replaced parameter: the optimizer still holds the old tensor under the name the model
    # now gives a new one, or (no names kept) an orphan of the same shape.
    replaced: list[tuple[int, int]] = []
    by_name = {names[pid]: pid for pid in orphans if not names[pid].startswith("param_groups[")}
    for pid in list(missing):
        old = next((by_name[n] for n in model_names[pid] if n in by_name), None)
        if old is None:
            shape = model_params[pid].shape
            same = [o for o in orphans if held_params[o].shape == shape and o not in dict(replaced).values()]
            old = same[0] if len(same) == 1 else None
        if old is not None and old in orphans:
            replaced.append((pid, old))
    for new, old in replaced:
        missing.remove(new)
        orphans.remove(old)

    findings = [
        Finding("not_in_optimizer", tuple(model_names[pid]), _shape(model_params[pid])) for pid in missing
    ]
    findings += [
        Finding(
            "replaced",
            tuple(model_names[new]),
            f"the optimizer holds the old {_shape(held_params[old])} at {where(old)}",
        )
        for new, old in replaced
    ]
    findings += [
        Finding("not_in_model", (names[pid],), f"{_shape(held_params[pid])}, {where(pid)}") for pid in orphans
    ]
    findings += [
        Finding(
            "requires_grad_false", tuple(model_names.get(pid) or [names[pid]]), f"{_shape(p)}, {where(pid)}"
        )
        for pid, p in held_params.items()
        if not p.requires_grad
    ]
    findings += [
        Finding(
            "held_twice",
            tuple(model_names.get(pid) or [names[pid]]),
            f"{_shape(held_params[pid])}, held {len(places)} times: "
            + ", ".join(f"group {gi} position {i}" for gi, i in places),
        )
        for pid, places in held.items()
        if len(places) > 1
    ]
    findings += [
        Finding("shared", tuple(ns), _shape(model_params[pid]))
        for pid, ns in model_names.items()
        if len(ns) > 1
    ]
    tables = row_tables(model)
    # Only safeopt's classes step by rows; torch's keep a group's "lazy" key and ignore it.
    rows_honoured = isinstance(optimizer, LazyOptimizer)
    findings += [
        Finding(
            "rows_not_lazy",
            tuple(model_names.get(pid) or [names[pid]]),
            f"{tables[pid]}, {_shape(held_params[pid])}, {where(pid)}",
        )
        for pid in held_params
        if pid in tables
        and not (rows_honoured and optimizer.param_groups[held[pid][0][0]].get("lazy") == ROWS)
    ]
    n_model = sum(1 for p in model_params.values() if p.requires_grad)
    return AuditReport(findings, n_model, len(held))
