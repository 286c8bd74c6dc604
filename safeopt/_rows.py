"""``lazy="rows"``: the rule applied to the rows (slices along dim 0) of a parameter.

An embedding table looked up a few rows at a time, or grouped mixture-of-experts weights that
keep every expert in one ``[E, ...]`` parameter, get a dense gradient whose rows are mostly zero.
In a group with ``lazy="rows"``, a parameter of two or more dimensions takes part row by row:

1. ``active_rows`` finds the rows of the grad with a nonzero element in one read of the grad.
2. Rows in long runs of one step count (whole experts) become views of the parameter, its grad
   and its per-element state. Other rows are gathered into compact tensors, one per distinct
   row step count ("bucket").
3. torch's own ``step()`` updates the views or buckets, each with its own ``step``, in a step of
   their own: every row gets torch's update with the bias correction of the steps *it* took part
   in. safeopt computes no update itself.
4. Buckets are written back into the parameter and its state; nothing else is touched.

Per-row counts live in the extra state key ``row_step`` (float32, one entry per row). It is
created the first time a parameter's rows are not all active; until then every row has taken
part in every step of the tensor, and torch's own step runs on the whole parameter unchanged.

A sparse COO grad (``nn.Embedding(sparse=True)``) is stepped as ``grad.coalesce().to_dense()``
would be, at the cost of the rows it names: ``touched_rows`` densifies only those rows, and the
steps above run on them. torch never sees the sparse grad.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from safeopt import _torch_compat
from safeopt._row_rule import ROWS
from safeopt._rule import GroupPlan
from safeopt._torch_compat import (
    MOMENTUM_BUFFER,
    STEP,
    skip_flag,
    skips_by_found_inf,
    untraced,
    writes_into_grads,
)

__all__ = ["ROW_STEP", "ROW_STEP_AT", "RowSteps", "allocate_state", "check", "restore_counts", "stamp_counts"]

ROW_STEP = "row_step"  # per-row step counts, next to torch's own state keys
# In a saved state only: the parameter's ``step`` when its ``row_step`` was saved. A Python float,
# which torch's load_state_dict keeps as it is (it casts tensors to the parameter's dtype).
ROW_STEP_AT = "row_step_at"


def allocate_state(optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[Tensor]) -> None:
    """``_torch_compat.allocate_state``; in a ``lazy="rows"`` group a sparse grad stands in as a
    dense zero grad while torch allocates (torch's Adam refuses sparse grads, and in such a group
    safeopt hands torch only dense rows). The stand-in is one element, expanded: nothing the size
    of the table is allocated for it."""
    swapped = [
        (p, p.grad)
        for p in params
        if group.get("lazy") == ROWS
        and p.dim() > 1
        and p.grad is not None
        and p.grad.layout is torch.sparse_coo
    ]
    try:
        for p, grad in swapped:
            p.grad = torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)
        _torch_compat.allocate_state(optimizer, group, params)
    finally:
        for p, grad in swapped:
            p.grad = grad


def check(optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]], *, twin: bool) -> None:
    """Raise ValueError, before anything changes, where ``lazy="rows"`` cannot be kept."""
    for i, group in enumerate(groups):
        if group.get("lazy") != ROWS:
            continue
        if not twin or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
            raise ValueError(
                f'lazy="rows" (param group {i}) is supported by safeopt.Adam, safeopt.AdamW and '
                f'safeopt.SGD only, not through wrap(): use safeopt.Adam(params, ..., lazy="rows") '
                f"instead of wrap(torch.optim.Adam(params, ...)), or lazy=True"
            )
        if group.get("differentiable"):
            raise ValueError(
                f'lazy="rows" does not support differentiable=True (param group {i}): active rows '
                "are written back outside autograd; use lazy=True"
            )


class _Job(NamedTuple):
    """One parameter stepped by rows in this step."""

    param: Tensor
    rows: Tensor  # the active rows, ordered by bucket
    counts: Tensor | None  # their row_step before the step, same order; None: SGD without momentum
    keys: list[str]  # per-element state keys gathered along with the parameter
    compact: dict[str, Tensor]  # gathered: "" -> the compact parameter; key -> the compact state
    buckets: list[tuple[float, int]]  # (the rows' step count, how many rows)
    shadows: list[Tensor]  # what torch steps: a split of compact[""] per bucket, or a run's view
    runs: list[tuple[int, int, float]]  # in place: each shadow's rows [start, stop) and count
    created: list[str]  # state keys this step created (all of them: "" too), undone if it fails
    skip: Tensor | None  # a fused step under GradScaler: the device flag of a step its kernels skip
    # per shadow: whether torch was given its per-element state (views or splits it updates in
    # place); not for SGD rows taking their first step, whose momentum buffer torch makes
    given: list[bool]


# A parameter whose active rows form few runs of consecutive rows with one count, each holding
# at least this many bytes of the parameter on average (whole experts of a grouped weight, say),
# is stepped in place, one view of the parameter and its state per run: nothing is gathered or
# written back. Short runs (scattered embedding rows) are gathered: a view costs more than
# copying a few hundred bytes.
_RUN_BYTES = 16384


def _runs(
    rows: Tensor, buckets: list[tuple[float, int]], row_bytes: int
) -> list[tuple[int, int, float]] | None:
    """The runs ``[start, stop)`` of consecutive rows (ordered by bucket) with the same count, or
    None when they are too short on average to be worth stepping in place."""
    limit = rows.numel() * row_bytes // _RUN_BYTES
    if not limit or (rows.numel() > 4096 and row_bytes < _RUN_BYTES):
        return None
    counts = itertools.chain.from_iterable(itertools.repeat(count, n) for count, n in buckets)
    runs: list[tuple[int, int, float]] = []
    for row, count in zip(rows.tolist(), counts):
        if runs and runs[-1][1] == row and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], row + 1, count)
        else:
            runs.append((row, row + 1, count))
            if len(runs) > limit:
                return None
    return runs


def _ensure_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], p: Tensor, sgd: bool, counted: bool
) -> list[str]:
    """Make the state a row step reads: torch's own (as torch allocates it), ``row_step`` and an
    SGD momentum buffer. Returns what it made ("" for the whole state), to undo on failure."""
    created: list[str] = []
    if not optimizer.state.get(p):
        allocate_state(optimizer, group, [p])  # Adam: zero moments, step 0, as torch makes them
        created.append("")
    state = optimizer.state[p]
    if counted and ROW_STEP not in state:
        # Until now every row took part in every step of the tensor. SGD keeps no step count:
        # there only "started" (a momentum buffer exists) matters, counted as 1.
        start = float(state[STEP]) if not sgd else float(MOMENTUM_BUFFER in state)
        state[ROW_STEP] = torch.full((p.shape[0],), start, dtype=torch.float32, device=p.device)
        created.append(ROW_STEP)
    if counted and sgd and MOMENTUM_BUFFER not in state:
        state[MOMENTUM_BUFFER] = torch.zeros_like(p, memory_format=torch.preserve_format)
        created.append(MOMENTUM_BUFFER)
    return created


def _buckets(
    row_step: Tensor, rows: Tensor, grad_rows: Tensor | None, sgd: bool
) -> tuple[Tensor, Tensor, Tensor | None, list[tuple[float, int]]]:
    """``rows`` (and ``grad_rows``) ordered by step count, their counts, and the buckets
    ``(count, how many rows)``. For SGD only "started or not" matters."""
    counts = row_step.index_select(0, rows)
    key = counts.clamp(max=1) if sgd else counts
    lo, hi = torch.stack(torch.aminmax(key)).tolist()
    if lo == hi:
        return rows, counts, grad_rows, [(lo, rows.numel())]
    key, order = torch.sort(key, stable=True)
    rows, counts = rows.index_select(0, order), counts.index_select(0, order)
    if grad_rows is not None:
        grad_rows = grad_rows.index_select(0, order)
    values, sizes = torch.unique_consecutive(key, return_counts=True)
    return rows, counts, grad_rows, list(zip(values.tolist(), sizes.tolist()))


def _shadow_states(
    state: dict[str, Any], parts: dict[str, list[Tensor]], counts: list[float], sgd: bool
) -> list[dict[str, Tensor]]:
    """The state torch finds for each shadow: its rows' step count and their per-element state
    (none for rows taking their first SGD step: torch makes their buffer from their grad)."""
    out = []
    for b, count in enumerate(counts):
        shadow_state = {}
        if STEP in state:
            shadow_state[STEP] = torch.full_like(state[STEP], count)
        if not (sgd and count == 0):
            shadow_state.update((k, parts[k][b]) for k in parts)
        out.append(shadow_state)
    return out


class RowSteps:
    """The row path of one step: ``prepare`` puts the buckets into the optimizer, ``finish`` takes them out."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self._state: Any = None
        # The state torch finds for each shadow: kept out of the optimizer's state, where another
        # thread's state_dict() would meet tensors it does not hold (torch's step reads it
        # through ``view``).
        self.states: dict[Tensor, dict[str, Any]] = {}
        self._grads: list[
            tuple[Tensor, Tensor | None]
        ] = []  # (param, the user's sparse grad) while densified

    @property
    def pending(self) -> bool:
        """Whether ``finish`` has anything to do: rows to write back, or users' grads to give back."""
        return bool(self.jobs or self._grads)

    # Not traced by dynamo (torch.compile), like the plan it carries out (``_rule.plan_step``):
    # traced, its code compiled for one step's plans ran again for another's (same lengths, other
    # parameters), stepping the parameters active in an earlier step (tests/test_compiled_probe.py).
    @untraced
    def prepare(
        self, optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]], plans: Sequence[GroupPlan]
    ) -> tuple[list[GroupPlan], list[list[Tensor]]]:
        """Gather the active rows of every row-stepped parameter. Returns the plans as the step
        carries them out (the given ones are not changed) and each group's buckets.

        A parameter whose rows are all active goes through torch's step whole, unless its rows
        already have different step counts (``row_step``): then it is stepped by rows as well.
        A sparse grad naming every row with a nonzero sum is, for that step, replaced by the
        densified grad (``touched_rows``): the parameter then goes the way a dense grad would.
        """
        self._state = optimizer.state
        out_plans: list[GroupPlan] = []
        out: list[list[Tensor]] = []
        try:
            with torch.no_grad():
                for group, plan in zip(groups, plans):
                    shadows: list[Tensor] = []
                    out.append(shadows)
                    if group.get("lazy") != ROWS:
                        out_plans.append(plan)
                        continue
                    active, rows = self._densify_whole(group, plan)
                    whole = {id(p) for p in active if p.dim() > 1 and ROW_STEP in optimizer.state.get(p, ())}
                    rows += [
                        (p, torch.arange(p.shape[0], device=p.device), None) for p in active if id(p) in whole
                    ]
                    active = [p for p in active if id(p) not in whole]
                    out_plans.append(plan._replace(active=active, rows=rows))
                    jobs: dict[int, _Job] = {}
                    for p, row_ids, grad_rows in rows:
                        if id(p) in jobs:  # held twice: torch steps the duplicate's rows twice
                            shadows.extend(jobs[id(p)].shadows)
                            continue
                        job, shadow_states = self._prepare(optimizer, group, p, row_ids, grad_rows)
                        jobs[id(p)] = job
                        self.jobs.append(job)
                        for shadow, shadow_state in zip(job.shadows, shadow_states):
                            self.states[shadow] = shadow_state
                        shadows.extend(job.shadows)
        except BaseException:
            self.finish(stepped=False)
            raise
        return out_plans, out

    def _densify_whole(
        self, group: dict[str, Any], plan: GroupPlan
    ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor, Tensor | None]]]:
        """The plan's active parameters and row entries once sparse grads naming every row (with
        a nonzero sum each) are whole: such a parameter joins the active ones, in group order,
        its grad the densified one until ``finish``."""
        whole = [
            (p, grad_rows)
            for p, rows, grad_rows in plan.rows
            if grad_rows is not None and rows.numel() == p.shape[0]
        ]
        if not whole:
            return list(plan.active), list(plan.rows)
        ids = {id(p) for p, _ in whole}
        for p, grad_rows in {id(p): (p, grad_rows) for p, grad_rows in whole}.values():  # once each
            self._grads.append((p, p.grad))
            p.grad = grad_rows  # every row, in order: the densified grad itself
        order = {id(p): i for i, p in enumerate(group["params"])}
        active = sorted([*plan.active, *(p for p, _ in whole)], key=lambda p: order[id(p)])
        return active, [entry for entry in plan.rows if id(entry[0]) not in ids]

    def _prepare(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict[str, Any],
        p: Tensor,
        rows: Tensor,
        grad_rows: Tensor | None,
    ) -> tuple[_Job, list[dict[str, Tensor]]]:
        """The job of one parameter and the state of each of its shadows. ``grad_rows``: the
        grad's rows ``rows`` (a sparse grad's, densified), or None to read them from ``p.grad``."""
        sgd = isinstance(optimizer, torch.optim.SGD)
        counted = not sgd or group["momentum"] != 0
        created = _ensure_state(optimizer, group, p, sgd, counted)
        state = optimizer.state[p]
        counts: Tensor | None = None
        buckets = [(0.0, rows.numel())]
        if counted:
            rows, counts, grad_rows, buckets = _buckets(state[ROW_STEP], rows, grad_rows, sgd)
        keys = [k for k, v in state.items() if k != ROW_STEP and isinstance(v, Tensor) and v.shape == p.shape]
        grad: Tensor = p.grad if grad_rows is None else grad_rows  # type: ignore[assignment]  # grad_rows is None only when p has a dense grad
        runs = None
        if all(t.is_contiguous() for t in (p, grad, *(state[k] for k in keys))):
            runs = _runs(rows, buckets, p.numel() // p.shape[0] * p.element_size())
        compact: dict[str, Tensor] = {}
        if runs is not None:  # views of the parameter, its grad and its state: stepped in place
            spans = [(start, stop) for start, stop, _ in runs]
            shadows = [p.detach()[start:stop] for start, stop in spans]
            if grad_rows is None:  # the user's grad: copied where torch would write into it
                copy = writes_into_grads(optimizer, group, shadows)
                grads = [grad[a:b].clone() if copy else grad[a:b] for a, b in spans]
            else:  # safeopt's own densified rows, in the order of ``rows``
                grads = list(grad_rows.split([b - a for a, b in spans]))
            parts = {k: [state[k][a:b] for a, b in spans] for k in keys}
            shadow_counts = [count for _, _, count in runs]
        else:  # gathered into compact tensors, one split per bucket
            sizes = [n for _, n in buckets]
            compact = {"": p.index_select(0, rows), **{k: state[k].index_select(0, rows) for k in keys}}
            shadows = list(compact[""].split(sizes))
            grads = list((grad.index_select(0, rows) if grad_rows is None else grad_rows).split(sizes))
            parts = {k: list(compact[k].split(sizes)) for k in keys}
            shadow_counts = [count for count, _ in buckets]
        for shadow, shadow_grad in zip(shadows, grads):
            shadow.grad = shadow_grad
        states = _shadow_states(state, parts, shadow_counts, sgd)
        skip = skip_flag(optimizer) if skips_by_found_inf(optimizer, group) else None
        given = [not (sgd and count == 0) for count in shadow_counts]
        job = _Job(p, rows, counts, keys, compact, buckets, shadows, runs or [], created, skip, given)
        return job, states

    def view(self, state: Any) -> Any:
        """``state`` with the shadows' states on top: the state torch's step on the rows reads."""
        return _StateView(state, self.states)

    @untraced  # as prepare: it reads what prepare made, and the host (GradScaler's skip)
    def finish(self, stepped: bool) -> None:
        """Write the stepped rows back (when the step returned) and take the buckets out of the
        state; give back the users' sparse grads. A step that did not return leaves no state
        behind that ``prepare`` created; nor does a step that GradScaler's ``found_inf`` had the
        fused kernels skip, beyond torch's own fresh state (Adam's zero moments, step 0)."""
        state = self._state
        skipped = False
        try:
            if stepped:
                skipped = self._skipped()
                with torch.no_grad():
                    for job in self.jobs:
                        if not (skipped and job.skip is not None):
                            self._write_back(job)
        finally:
            for job in self.jobs:
                for shadow in job.shadows:
                    self.states.pop(shadow, None)
                    shadow.grad = None
                if not stepped:
                    if "" in job.created:
                        state.pop(job.param, None)
                    else:
                        for key in job.created:
                            state[job.param].pop(key, None)
                elif skipped and job.skip is not None:
                    for key in job.created:
                        if key:
                            state[job.param].pop(key, None)
            self.jobs = []
            for p, grad in self._grads:
                p.grad = grad
            self._grads = []

    def _skipped(self) -> bool:
        """Whether the fused kernels skipped this step, read on the host only where the answer
        decides which state keys stay: a job under GradScaler that created ``row_step`` or a
        momentum buffer. Everything else a skip must undo is undone on the device."""
        for job in self.jobs:
            if job.skip is not None and any(job.created):
                return bool(job.skip)  # one host read: every job of a step shares found_inf
        return False

    def _write_back(self, job: _Job) -> None:
        state = self._state[job.param]
        first = self.states[job.shadows[0]]
        if job.runs:  # stepped in place; torch made new SGD momentum buffers for first-step runs
            for key in job.keys:
                for shadow, (start, stop, _), given in zip(job.shadows, job.runs, job.given):
                    if given:  # torch updated the views of the state in place
                        continue
                    made = self.states[shadow].get(key)
                    if made is not None and made.data_ptr() != state[key][start:stop].data_ptr():
                        state[key][start:stop].copy_(_unless_skipped(job.skip, made, state[key][start:stop]))
        else:
            sizes = [n for _, n in job.buckets]
            for key in job.keys:
                # torch replaces a missing SGD momentum buffer by a new tensor: copy it into place.
                for part, shadow in zip(job.compact[key].split(sizes), job.shadows):
                    made = self.states[shadow].get(key)
                    if made is not None and made is not part:
                        part.copy_(_unless_skipped(job.skip, made, part))
                _copy_rows(state[key], job.rows, job.compact[key])
            _copy_rows(job.param, job.rows, job.compact[""])
        if job.counts is None:
            return
        if STEP in first:
            # torch's step advanced each bucket's step by one (by none where a fused kernel found
            # an inf under GradScaler); the tensor's step counts steps with any row active.
            advanced = first[STEP] - (job.runs[0][2] if job.runs else job.buckets[0][0])
            state[STEP].add_(advanced)
            advanced = advanced.to(job.counts.device, torch.float32)
        elif job.skip is not None:  # SGD: a skipped step starts no row and counts for none
            advanced = job.skip.logical_not().to(job.counts.device, torch.float32)
        else:
            advanced = 1
        state[ROW_STEP].index_copy_(0, job.rows, job.counts + advanced)


def _unless_skipped(skip: Tensor | None, made: Tensor, old: Tensor) -> Tensor:
    """A momentum buffer torch's fused SGD made for rows taking their first step: ``empty_like``
    filled by the kernel, or left uninitialised when the kernel skipped the step; then the rows
    keep ``old``. Decided on the device."""
    return made if skip is None else torch.where(skip.to(made.device), old, made)


class _StateView(dict[Tensor, Any]):
    """The shadows' states, and the optimizer's for any other key (created there, as torch's
    defaultdict does, for a parameter stepped for the first time)."""

    def __init__(self, base: Any, shadows: dict[Tensor, dict[str, Any]]) -> None:
        super().__init__(shadows)
        self.base = base

    def __missing__(self, key: Tensor) -> Any:
        return self.base[key]

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.base

    def get(self, key: Tensor, default: Any = None) -> Any:
        return dict.get(self, key) if dict.__contains__(self, key) else self.base.get(key, default)


# Write-backs are bit copies. Rows viewed as 16-byte elements (complex128, the widest dtype) go
# through torch's index_copy_ as a quarter as many elements as float32 rows: measured a third
# faster on the CPU for 256-byte rows, the same bits (tests/test_rows_sparse.py).
_WIDE = torch.complex128


def _copy_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """``dst.index_copy_(0, rows, src)``, through 16-byte elements where the layout allows."""
    if dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype and dst.dim() and src.shape[0]:
        row_bytes = dst[0].numel() * dst.element_size()
        if (
            row_bytes
            and row_bytes % 16 == 0
            and (dst.storage_offset() * dst.element_size()) % 16
            == 0
            == (src.storage_offset() * src.element_size()) % 16
        ):
            wide = (dst.shape[0], row_bytes // 16)
            dst.view(dst.shape[0], -1).view(_WIDE).view(wide).index_copy_(
                0, rows, src.reshape(src.shape[0], -1).view(_WIDE)
            )
            return
    dst.index_copy_(0, rows, src)


def stamp_counts(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's, of ``optimizer``) with ``ROW_STEP_AT`` beside the ``row_step`` of
    each parameter of a ``lazy="rows"`` group that keeps a ``step`` (Adam, AdamW). One host read
    of ``step`` per such parameter. The live state is not changed (torch's state_dict shares its
    dicts)."""
    packed = state_dict["state"]
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        if group.get("lazy") != ROWS:
            continue
        for i, p in zip(saved["params"], group["params"]):
            state = optimizer.state.get(p)
            if state and ROW_STEP in state and STEP in state and i in packed:
                packed[i] = {**packed[i], ROW_STEP_AT: float(state[STEP])}
    return state_dict


def _exact_up_to(dtype: torch.dtype) -> float:
    """``dtype`` holds every count up to this one exactly (2 / eps: 256 in bfloat16, 2048 in float16)."""
    return 2.0 / torch.finfo(dtype).eps if dtype.is_floating_point else float("inf")


def restore_counts(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After a load: ``row_step`` as saved, in float32 (torch's load casts it to the parameter's
    dtype), and brought up to date with the steps a torch optimizer took in between.

    - A ``row_step`` saved by a torch optimizer that had loaded it was rounded to the
      parameter's dtype there (bfloat16 holds every count only up to 256): warned about when a
      count is past that, since the lost counts cannot be told.
    - ``ROW_STEP_AT`` says the ``step`` the counts were current at. A torch optimizer that
      loaded them and stepped the parameter k times stepped every row k times (and did not count
      them): every row's count gets k. SGD keeps no step: there a row counted as not started whose
      momentum buffer row is no longer zero was started by such a step, and counts as started.
    """
    _torch_compat.saved_as_is(optimizer, state_dict, ROW_STEP, torch.float32)
    saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_state = state_dict.get("state", {})
    for saved_id, p in zip(saved_ids, params):
        state = optimizer.state.get(p)
        if not state:
            continue
        at = state.pop(ROW_STEP_AT, None)
        saved = saved_state.get(saved_id, {})
        counts = state.get(ROW_STEP)
        if not isinstance(counts, Tensor):
            continue
        saved_counts = saved.get(ROW_STEP)
        if isinstance(saved_counts, Tensor) and saved_counts.dtype != torch.float32 and saved_counts.numel():
            limit = _exact_up_to(saved_counts.dtype)
            if float(saved_counts.max()) > limit:
                warnings.warn(
                    f"row_step of a {tuple(p.shape)} parameter was saved as {saved_counts.dtype} by an "
                    f"optimizer that loaded it (torch's load_state_dict casts extra state to the "
                    f"parameter's dtype): counts above {limit:g} are rounded, and those rows' bias "
                    f'correction follows the rounded count. Save and load lazy="rows" state with '
                    f"safeopt's optimizers to keep the counts exact",
                    stacklevel=4,
                )
        if STEP in state and isinstance(at, float):
            missed = float(state[STEP]) - at
            if missed > 0:  # a new tensor: the loaded one may be the caller's state_dict's own
                state[ROW_STEP] = counts + missed
        elif STEP not in state and MOMENTUM_BUFFER in state:
            buffer = state[MOMENTUM_BUFFER]
            started = buffer.reshape(buffer.shape[0], -1).ne(0).any(1)
            state[ROW_STEP] = counts.masked_fill(counts.eq(0) & started.to(counts.device), 1.0)
