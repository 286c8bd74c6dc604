"""``safeopt.bench``: what safeopt costs on your model, timed against torch in one process.

Both optimizers step copies of the model's parameters with the same grads, in interleaved rounds
timed by ``torch.utils.benchmark`` (``Timer``, ``blocked_autorange`` for the warm-up and the block
size, ``Compare`` for the table). ``benchmarks/`` runs its suites through this function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from safeopt._optimizers import SGD, Adam, AdamW
from safeopt._rule import Lazy
from safeopt._wrap import wrap

if TYPE_CHECKING:
    from torch.utils.benchmark import Compare, Measurement

__all__ = ["BenchReport", "BenchRow", "Launches", "bench", "count_launches"]

IdleBy = Literal["zero", "freeze", "rows"]
Factory = Callable[[list[nn.Parameter]], Optimizer]
_TWINS: dict[type[Optimizer], type[Adam | AdamW | SGD]] = {
    torch.optim.Adam: Adam,
    torch.optim.AdamW: AdamW,
    torch.optim.SGD: SGD,
}
_ROW_GRADS = 3  # lazy="rows": grads with different active rows, taken in turn, so row step counts differ


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One configuration: torch's and safeopt's step times, their ratio, memory and host syncs."""

    idle: float  #: the fraction of the elements (``"rows"``: of the rows) without a gradient
    idle_by: str  #: ``"zero"``, ``"freeze"`` or ``"rows"``
    torch: Measurement  #: torch's step, one time per interleaved round (seconds a step)
    safeopt: Measurement  #: safeopt's step, the same rounds
    ratio: float  #: median over the rounds of safeopt's time / torch's time in that round
    extra_mb_torch: float | None  #: memory a torch step allocates beyond params, grads and state
    extra_mb_safeopt: float | None
    syncs_torch: int | None  #: host synchronisations in one step (CUDA only, else None)
    syncs_safeopt: int | None
    #: kernel launches and host reads of one step (:func:`count_launches`; any device)
    launches_torch: Launches | None = None
    launches_safeopt: Launches | None = None

    @property
    def torch_ms(self) -> float:
        """torch's step time, median over the rounds, in milliseconds."""
        return float(self.torch.median) * 1e3

    @property
    def safeopt_ms(self) -> float:
        """safeopt's step time, median over the rounds, in milliseconds."""
        return float(self.safeopt.median) * 1e3


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """What :func:`bench` returns: one :class:`BenchRow` per idle fraction; ``str()`` is the table."""

    label: str
    rounds: int
    rows: list[BenchRow]

    def compare(self) -> Compare:
        """The step times as a ``torch.utils.benchmark.Compare`` (torch and safeopt side by side)."""
        from torch.utils.benchmark import Compare

        return Compare([m for r in self.rows for m in (r.torch, r.safeopt)])

    def table(self) -> str:
        """``Compare``'s table of the times, then the ratios, the memory and the host syncs."""

        def cell(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        width = max(len(r.torch.sub_label or "") for r in self.rows)
        lines = [
            (
                f"safeopt / torch: median over {self.rounds} interleaved rounds; extra MB: memory a step "
                "allocates beyond parameters, grads and state; host syncs: in one step (CUDA only); "
                "launches/reads: aten ops that are not views and host reads in one step"
            ),
            (
                f"{'':<{width}} {'safeopt/torch':>13} {'extra MB torch':>15} {'extra MB safeopt':>17} "
                f"{'syncs torch':>12} {'syncs safeopt':>14} {'launches/reads torch':>21} "
                f"{'launches/reads safeopt':>23}"
            ),
        ]

        def counted(c: Launches | None) -> str:
            return "-" if c is None else f"{c.launches}/{c.reads}"

        for r in self.rows:
            lines.append(
                f"{r.torch.sub_label:<{width}} {r.ratio:>13.2f} {cell(r.extra_mb_torch, '.1f'):>15} "
                f"{cell(r.extra_mb_safeopt, '.1f'):>17} {cell(r.syncs_torch, 'd'):>12} "
                f"{cell(r.syncs_safeopt, 'd'):>14} {counted(r.launches_torch):>21} "
                f"{counted(r.launches_safeopt):>23}"
            )
        return str(self.compare()).rstrip() + "\n\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def bench(
    model: nn.Module | Iterable[Tensor],
    optimizer: Factory,
    *,
    idle: float | Sequence[float] = 0.0,
    idle_by: IdleBy = "zero",
    safe_optimizer: Factory | None = None,
    rounds: int = 7,
    min_run_time: float = 1.0,
    memory: bool = True,
    label: str | None = None,
    verbose: bool = True,
) -> BenchReport:
    """Time ``optimizer.step()`` with safeopt against torch on ``model``'s parameters.

    ``optimizer`` builds a torch optimizer from a list of parameters, e.g.
    ``lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)``. The safeopt side is
    ``safe_optimizer(params)`` if given, else the safeopt twin of what ``optimizer`` builds
    (``safeopt.Adam``, ``AdamW`` or ``SGD`` with the same param groups and options), else
    ``safeopt.wrap`` of it. Both step *copies* of the parameters (the model is not changed), with
    the same random grads; parameters with ``requires_grad=False`` get no grad.

    ``idle``: the fraction (or fractions, one row each) of the work without a gradient:

    - ``idle_by="zero"``: the last parameters, up to that fraction of the elements, get all-zero
      grads (torch steps them, safeopt checks and skips them);
    - ``"freeze"``: the same parameters are frozen in the safeopt optimizer, grads dense;
    - ``"rows"``: in every parameter of two or more dimensions that fraction of the rows gets a
      zero grad, different rows each step; the safeopt twin gets ``lazy="rows"``.

    Each side takes a warm-up (``Timer.blocked_autorange``, which also sizes the timed blocks),
    then ``rounds`` interleaved rounds, alternating which goes first, each timing the same number
    of steps of both, about ``min_run_time`` seconds per side in all. ``ratio`` is the median of
    the per-round ratios. ``memory``: also measure what one step allocates (CUDA: peak allocated;
    CPU: from ``torch.profiler``). On CUDA, host synchronisations in one step are counted with
    ``torch.cuda.set_sync_debug_mode("warn")``; on any device, the kernel launches and host reads
    of one step with :func:`count_launches`. Prints the table unless ``verbose=False``.
    """
    if idle_by not in ("zero", "freeze", "rows"):
        raise ValueError(f'Invalid idle_by: {idle_by!r}; expected "zero", "freeze" or "rows"')
    fractions = [float(idle)] if isinstance(idle, (int, float)) else [float(f) for f in idle]
    if not fractions:
        raise ValueError("Invalid idle: an empty list; expected a fraction from 0 to 1, or a list of them")
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"Invalid idle fraction: {f}; expected a number from 0 to 1")
    if rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds}; expected at least 1")
    source = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    source = list({id(p): p for p in source}.values())
    if not any(p.requires_grad for p in source):
        raise ValueError("bench() needs at least one parameter with requires_grad=True")
    params = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in source]
    rows = [
        _measure(params, optimizer, safe_optimizer, f, idle_by, rounds, min_run_time, memory, label)
        for f in fractions
    ]
    report = BenchReport(rows[0].torch.label or "", rounds, rows)
    if verbose:
        print(report)
    return report


def _describe(opt: Optimizer) -> str:
    """``"AdamW fused"``: the class and, when chosen, the implementation."""
    impl = next((k for k in ("fused", "foreach") if opt.defaults.get(k)), None)
    if impl is None and opt.defaults.get("foreach") is False:
        impl = "forloop"
    return type(opt).__name__ + (f" {impl}" if impl else "")


def _twin(opt: Optimizer, lazy: Lazy) -> Optimizer:
    """The safeopt optimizer that does what ``opt`` does: the twin class, else ``wrap(opt)``."""
    cls = _TWINS.get(type(opt))
    if cls is None:
        if lazy == "rows":
            raise ValueError(
                f'idle_by="rows" needs safeopt.Adam, AdamW or SGD; {type(opt).__name__} has no row-lazy '
                "twin (pass safe_optimizer= to choose the safeopt side)"
            )
        return wrap(opt)
    accepted = inspect.signature(cls).parameters
    options = {k: v for k, v in opt.defaults.items() if k in accepted}
    return cls([dict(g) for g in opt.param_groups], **options, lazy=lazy)


def _idle_tensors(params: list[nn.Parameter], idle: float) -> set[int]:
    """Positions of the last trainable parameters, until ``idle`` of the trainable elements."""
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    total = sum(params[i].numel() for i in trainable)
    out: set[int] = set()
    count = 0
    for i in reversed(trainable):
        if count >= idle * total - 1e-9:
            break
        out.add(i)
        count += params[i].numel()
    return out


def _grads(params: list[nn.Parameter], idle: float, idle_by: str) -> list[list[Tensor | None]]:
    """The grads each step sets, in turn: one list for "zero" and "freeze", a few for "rows"."""
    zero = _idle_tensors(params, idle) if idle_by == "zero" else set()
    sets: list[list[Tensor | None]] = []
    for _ in range(_ROW_GRADS if idle_by == "rows" else 1):
        grads: list[Tensor | None] = []
        for i, p in enumerate(params):
            if not p.requires_grad:
                grads.append(None)
            elif i in zero:
                grads.append(torch.zeros_like(p))
            elif idle_by == "rows" and p.dim() >= 2:
                g = torch.zeros_like(p)
                n = p.shape[0]
                active = torch.randperm(n, device=p.device)[: round((1 - idle) * n)]
                g[active] = torch.randn((len(active), *p.shape[1:]), dtype=p.dtype, device=p.device)
                grads.append(g)
            else:
                grads.append(torch.randn_like(p))
        sets.append(grads)
    return sets


def _stepper(
    opt: Optimizer, params: list[nn.Parameter], grads: list[list[Tensor | None]]
) -> Callable[[], None]:
    if len(grads) == 1:
        return opt.step
    turn = [0]

    def step() -> None:
        for p, g in zip(params, grads[turn[0] % len(grads)]):
            p.grad = g
        turn[0] += 1
        opt.step()

    return step


def _measure(
    params: list[nn.Parameter],
    optimizer: Factory,
    safe_optimizer: Factory | None,
    idle: float,
    idle_by: str,
    rounds: int,
    min_run_time: float,
    memory: bool,
    label: str | None,
) -> BenchRow:
    from torch.utils.benchmark import Measurement, Timer

    grads = _grads(params, idle, idle_by)
    for p, g in zip(params, grads[0]):
        p.grad = g
    ref = optimizer(params)
    lazy: Lazy = "rows" if idle_by == "rows" else True
    mine = safe_optimizer(params) if safe_optimizer is not None else _twin(optimizer(params), lazy)
    if idle_by == "freeze":
        frozen = _idle_tensors(params, idle)
        if frozen:
            mine.freeze([params[i] for i in sorted(frozen)])  # type: ignore[attr-defined]  # a safeopt optimizer or wrap()'s result: both have freeze()
    if label is None:
        label = f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.3g}M elements"
    steps = {"torch": _stepper(ref, params, grads), "safeopt": _stepper(mine, params, grads)}
    for _ in grads:  # allocate state (and, for rows, step every row) outside the timed region
        steps["torch"]()
        steps["safeopt"]()
    timers = {
        name: Timer(
            "step()",
            globals={"step": step},
            label=label,
            sub_label=f"{_describe(ref)}, {idle:.0%} idle ({idle_by})",
            description=name,
            num_threads=torch.get_num_threads(),
        )
        for name, step in steps.items()
    }
    warm = {name: t.blocked_autorange(min_run_time=min_run_time / rounds) for name, t in timers.items()}
    number = max(1, round(min_run_time / rounds / warm["torch"].median))
    times: dict[str, list[Measurement]] = {"torch": [], "safeopt": []}
    for r in range(rounds):
        for name in ("safeopt", "torch") if r % 2 else ("torch", "safeopt"):  # neither always first
            times[name].append(timers[name].timeit(number))
    ratio = statistics.median(b.median / a.median for a, b in zip(times["torch"], times["safeopt"]))
    device = next((p.device for p in params if p.device.type != "cpu"), torch.device("cpu"))
    row = BenchRow(
        idle,
        idle_by,
        Measurement.merge(times["torch"])[0],
        Measurement.merge(times["safeopt"])[0],
        ratio,
        _extra_mb(steps["torch"], device) if memory else None,
        _extra_mb(steps["safeopt"], device) if memory else None,
        _syncs(steps["torch"], device),
        _syncs(steps["safeopt"], device),
        count_launches(steps["torch"]),
        count_launches(steps["safeopt"]),
    )
    del ref, mine, steps, timers
    for p in params:
        p.grad = None
    return row


def _extra_mb(step: Callable[[], Any], device: torch.device) -> float:
    """Memory one step allocates beyond what exists before it (CUDA: peak; CPU: profiler's bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.events() or []
    allocated: int = sum(e.cpu_memory_usage for e in events if e.cpu_memory_usage > 0 and not e.cpu_children)
    return allocated / 2**20


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _syncs(step: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations in one step, as ``set_sync_debug_mode("warn")`` reports them (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


#: aten ops that copy tensor data to the host. ``Tensor.tolist`` is counted too (on the CPU it
#: reads memory without the dispatcher); on an accelerator each of these is a synchronisation.
HOST_READS = frozenset(
    {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default"}
)
#: Allocations: no kernel on an accelerator.
_NO_KERNEL = frozenset({"aten.empty.memory_format", "aten.empty_strided.default"})


@dataclasses.dataclass(frozen=True)
class Launches:
    """What one step asks of an accelerator, counted on any device: the aten ops that are not
    views (each at least one kernel launch on a GPU) and the reads of tensor data on the host."""

    launches: int
    reads: int
    ops: dict[str, int]  #: the launches by aten op


def count_launches(step: Callable[[], Any]) -> Launches:
    """Run ``step()`` once and count its kernel launches and host reads (a ``TorchDispatchMode``).

    Counted on the CPU, a step's launches are those a GPU would run for the same decisions: an
    op's CPU kernel loops over a list where the CUDA one launches one multi-tensor kernel, and
    each counts once either way. Ops that decompose before dispatch are counted as their parts.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: dict[str, int] = {}
    reads = [0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = str(func)
            if name in HOST_READS:
                reads[0] += 1
            elif not func.is_view and name not in _NO_KERNEL and not name.startswith("profiler."):
                ops[name] = ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    tolist = Tensor.tolist

    def counted_tolist(self: Tensor) -> Any:
        reads[0] += 1
        return tolist(self)

    Tensor.tolist = counted_tolist  # type: ignore[method-assign,assignment]  # restored below; CPU tolist bypasses the dispatcher
    try:
        with Counter():
            step()
    finally:
        Tensor.tolist = tolist  # type: ignore[method-assign]  # restoring torch's own
    return Launches(sum(ops.values()), reads[0], ops)
