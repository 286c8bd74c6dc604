"""The compatibility matrix of ``safeopt.wrap``: every optimizer of the catalogue, checked.

Usage::

    python tests/compat_matrix.py            # writes docs/compat.md
    python tests/compat_matrix.py --check    # exits 1 when docs/compat.md differs from a fresh run

``tests/test_compat.py`` runs the same checks one optimizer at a time and compares the committed
page with a fresh generation. The optimizers come from the ``compat`` extra (``pip install
torch-safeopt[compat]``); a package that does not install or import is a row saying so.

Every check runs on the CPU, on four 2-D parameters whose grads follow one schedule over four
steps: one always dense, two alternating between dense, all-zero and None, one always all-zero.
The reference is the bare optimizer on clones given None for the inactive parameters, and not
stepped at all in a step where nothing is active (see docs/rule.md); for an optimizer whose step
visits every parameter it holds (Lookahead's sync), the bare optimizer holding only the parameters
with a grad in each step.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import io
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import safeopt

PAGE = Path(__file__).resolve().parent.parent / "docs" / "compat.md"
SHAPES = ((4, 3), (3, 4), (2, 3), (3, 2))
# 4096 elements each: bitsandbytes and torchao keep 8-bit (4-bit, fp8) state from that size on.
LARGE = ((64, 64),) * 4  # one shape: torchao compiles its step once per shape
# Per step, per parameter: "d" dense, "z" all-zero, "-" None.
SCHEDULE = ["dz-z", "dd-z", "d-dz", "ddzz"]
COLUMNS = (
    "bare, zero grads",
    "accepted",
    "parity",
    "idle untouched",
    "strict",
    "state_dict",
    "freeze",
    "nothing active",
    "step count",
)


class Entry(NamedTuple):
    name: str  # as the user writes it
    package: str  # the distribution that provides it
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    prepare: Callable[[Any], None] | None = None  # called on the wrapper and on the reference
    shapes: tuple[tuple[int, int], ...] = SHAPES
    # Its step visits every parameter it holds, grad or not (Lookahead's sync): the reference holds
    # only the parameters with a grad in each step (see _OnlyActive).
    visits_all: bool = False


def _load(module: str, attr: str, **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return getattr(importlib.import_module(module), attr)(params, **kwargs)  # type: ignore[no-any-return]

    return make


def _train(opt: Any) -> None:
    opt.train()


def _torch(name: str, **kwargs: Any) -> Entry:
    return Entry(f"torch.optim.{name}", "torch", _load("torch.optim", name, **kwargs))


def _po(name: str, **kwargs: Any) -> Entry:
    prepare = _train if name.startswith("ScheduleFree") else None
    return Entry(
        f"pytorch_optimizer.{name}", "pytorch-optimizer", _load("pytorch_optimizer", name, **kwargs), prepare
    )


def _lookahead(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    import torch_optimizer

    return torch_optimizer.Lookahead(torch.optim.Adam(params, lr=0.01), k=2, alpha=0.8)  # type: ignore[no-any-return]


CATALOGUE: list[Entry] = [
    _torch("Adam", lr=0.01),
    _torch("AdamW", lr=0.01),
    _torch("SGD", lr=0.01, momentum=0.9),
    _torch("NAdam", lr=0.01),
    _torch("RAdam", lr=0.01),
    _torch("Adamax", lr=0.01),
    _torch("ASGD", lr=0.01),
    _torch("Rprop", lr=0.01),
    _torch("Adagrad", lr=0.01),
    _torch("Adadelta"),
    _torch("RMSprop", lr=0.01),
    _torch("Adafactor", lr=0.01),
    _torch("Muon", lr=0.01),
    _torch("LBFGS"),
    *[
        _po(name, **kwargs)
        for name, kwargs in [
            ("Lion", {"lr": 1e-3}),
            ("Adan", {}),
            ("Lamb", {}),
            ("Prodigy", {}),
            ("AdaBelief", {}),
            ("SOAP", {}),
            ("ADOPT", {}),
            ("CAME", {}),
            ("AdEMAMix", {}),
            ("MARS", {}),
            ("Kron", {}),
            ("StableAdamW", {}),
            ("Tiger", {}),
            ("Ranger", {}),
            ("Ranger21", {"num_iterations": 10}),
            ("ScheduleFreeAdamW", {}),
            ("ScheduleFreeSGD", {}),
            ("AdamP", {}),
            ("MADGRAD", {}),
            ("LaProp", {}),
            ("Yogi", {}),
            ("DiffGrad", {}),
            ("AdaBound", {}),
            ("NovoGrad", {}),
            ("SignSGD", {}),
            ("SM3", {}),
            ("Shampoo", {}),
        ]
    ],
    Entry(
        "schedulefree.AdamWScheduleFree",
        "schedulefree",
        _load("schedulefree", "AdamWScheduleFree", lr=0.01),
        _train,
    ),
    Entry(
        "schedulefree.SGDScheduleFree",
        "schedulefree",
        _load("schedulefree", "SGDScheduleFree", lr=0.01),
        _train,
    ),
    Entry(
        "schedulefree.RAdamScheduleFree",
        "schedulefree",
        _load("schedulefree", "RAdamScheduleFree", lr=0.01),
        _train,
    ),
    Entry("lion_pytorch.Lion", "lion-pytorch", _load("lion_pytorch", "Lion", lr=1e-3)),
    Entry("prodigyopt.Prodigy", "prodigyopt", _load("prodigyopt", "Prodigy")),
    Entry("came_pytorch.CAME", "came-pytorch", _load("came_pytorch", "CAME", lr=1e-3)),
    Entry(
        "adam_atan2_pytorch.AdamAtan2",
        "adam-atan2-pytorch",
        _load("adam_atan2_pytorch", "AdamAtan2", lr=1e-3),
    ),
    *[
        Entry(f"dadaptation.{name}", "dadaptation", _load("dadaptation", name))
        for name in ("DAdaptAdam", "DAdaptSGD", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptLion")
    ],
    *[
        Entry(f"torch_optimizer.{name}", "torch-optimizer", _load("torch_optimizer", name))
        for name in ("Yogi", "DiffGrad", "QHAdam", "AdaBound", "AdaMod", "SWATS", "AccSGD", "RangerVA")
    ],
    Entry("torch_optimizer.Lookahead", "torch-optimizer", _lookahead, visits_all=True),
    *[
        Entry(
            f"bitsandbytes.optim.{name}",
            "bitsandbytes",
            _load("bitsandbytes.optim", name, lr=0.01),
            shapes=LARGE,
        )
        for name in ("Adam8bit", "AdamW8bit", "Lion8bit", "Adam32bit")
    ],
    *[
        Entry(f"torchao.optim.{name}", "torchao", _load("torchao.optim", name, lr=0.01), shapes=LARGE)
        for name in ("AdamW8bit", "AdamW4bit", "AdamWFp8")
    ],
]

HOLDS = {"yes", "per param", "per group", "none seen"}  # a column's verdicts that hold
PACKAGES = sorted({entry.package for entry in CATALOGUE} - {"torch"})


# --- snapshots and comparisons that also take tensor subclasses (torchao's quantized state) ---


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            return ("subclass", {name: _copy(getattr(value, name)) for name in names})
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "subclass":
        return isinstance(b, tuple) and b[:1] == ("subclass",) and _equal(a[1], b[1])
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if (a.dtype, a.shape, a.layout) != (b.dtype, b.shape, b.layout):
            return False
        if a.layout is not torch.strided:
            a, b = a.to_dense(), b.to_dense()
        return torch.equal(a, b) or bool(torch.isnan(a).logical_and(torch.isnan(b)).logical_or(a == b).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  # objects without a comparable value: not part of the check
        return True


def _fresh(state: dict[str, Any]) -> bool:
    """State no update touched: what safeopt allocates for an idle torch parameter."""
    for key, v in state.items():
        if key == "step" and float(v) != 0:
            return False
        if (
            isinstance(v, Tensor)
            and type(v) is Tensor
            and v.numel() > 1
            and not bool((v == v.flatten()[0]).all())
        ):
            return False
    return True


def _state_of(opt: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
    return dict(opt.state.get(p, {}))


# --- one run ---


def _grads(step: int, params: list[nn.Parameter], seed: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(1000 * seed + step)
    out: list[Tensor | None] = []
    for kind, p in zip(SCHEDULE[step % len(SCHEDULE)], params):
        dense = torch.randn(p.shape, generator=gen)
        out.append(None if kind == "-" else dense if kind == "d" else torch.zeros(p.shape))
    return out


def _params(entry: Entry) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in entry.shapes]


def _seed(seed: int) -> None:
    """Seed what optimizers sample from: torch, and numpy's global generator (pytorch-optimizer's
    Kron balances its preconditioner when ``np.random.random() < 0.01``)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


class Failure(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise Failure(what)


def _step_pair(
    opt: Any, ref: Any, params: list[nn.Parameter], ref_params: list[nn.Parameter], grads: list[Tensor | None]
) -> tuple[list[int], list[Any]]:
    """One step of the wrapper and of the reference; returns the idle positions and their snapshot."""
    active = [g is not None and bool(g.any()) for g in grads]
    for p, q, g, a in zip(params, ref_params, grads, active):
        p.grad = None if g is None else g.clone()
        q.grad = g.clone() if a else None  # type: ignore[union-attr]
    idle = [i for i, a in enumerate(active) if not a]
    before = [
        (params[i].grad, _copy(params[i]), _copy(params[i].grad), _copy(_state_of(opt, params[i])))
        for i in idle
    ]
    _seed(step_seed := len(idle) * 7919 + sum(map(int, active)))  # optimizers that sample (Kron)
    opt.step()
    if ref is not None and any(active):
        _seed(step_seed)
        ref.step()
    return idle, before


def _idle_untouched(opt: Any, params: list[nn.Parameter], idle: list[int], before: list[Any]) -> None:
    for i, (grad, value, grad_value, state) in zip(idle, before):
        p = params[i]
        _check(_equal(_copy(p), value), f"idle param {i} moved")
        _check(p.grad is grad and _equal(_copy(p.grad), grad_value), f"idle param {i}'s grad changed")
        now = _copy(_state_of(opt, p))
        _check(_equal(now, state) if state else _fresh(now), f"idle param {i}'s state changed")


def _parity(opt: Any, ref: Any, params: list[nn.Parameter], ref_params: list[nn.Parameter]) -> None:
    for i, (p, q) in enumerate(zip(params, ref_params)):
        _check(_equal(_copy(p), _copy(q)), f"param {i} differs from the bare optimizer")
        mine, theirs = _copy(_state_of(opt, p)), _copy(_state_of(ref, q))
        _check(
            _equal(mine, theirs) if theirs else _fresh(mine),
            f"param {i}'s state differs from the bare optimizer",
        )


def _build(entry: Entry, params: list[nn.Parameter], **options: Any) -> Any:
    opt = safeopt.wrap(entry.make(params), **options)
    if entry.prepare is not None:
        entry.prepare(opt)  # through the wrapper: its public methods are the wrapped optimizer's
    return opt


def _reference_on(entry: Entry, params: list[nn.Parameter]) -> Any:
    ref = entry.make(params)
    if entry.prepare is not None:
        entry.prepare(ref)
    return _OnlyActive(ref) if entry.visits_all else ref


class _OnlyActive:
    """The bare optimizer as if it held only the parameters that have a grad: each step sees
    only those in ``group["params"]``. The reference for an optimizer whose step visits every
    parameter it holds (Lookahead syncs each with its slow copy): safeopt's step equals the
    step of an optimizer holding only the active parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        from safeopt._torch_compat import HOOK_DICTS

        for name in HOOK_DICTS:  # torch-optimizer's Lookahead has none: its state_dict() needs them
            if not hasattr(optimizer, name):
                setattr(optimizer, name, {})
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def step(self, closure: Any = None) -> Any:
        groups = self.optimizer.param_groups
        held = [group["params"] for group in groups]
        try:
            for group in groups:
                group["params"] = [p for p in group["params"] if p.grad is not None]
            return self.optimizer.step(closure)
        finally:
            for group, params in zip(groups, held):
                group["params"] = params


def _run(entry: Entry, strict: bool) -> tuple[str, str]:
    """(parity, idle untouched) over the schedule."""
    params = _params(entry)
    opt = _build(entry, params, strict=strict)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = _reference_on(entry, ref_params)
    parity, idle_ok = "yes", "yes"
    for step in range(len(SCHEDULE)):
        idle, before = _step_pair(opt, ref, params, ref_params, _grads(step, params, 0))
        if idle_ok == "yes":
            try:
                _idle_untouched(opt, params, idle, before)
            except Failure as e:
                idle_ok = f"no: {e} (step {step + 1})"
        if parity == "yes":
            try:
                _parity(opt, ref, params, ref_params)
            except Failure as e:
                parity = f"no: {e} (step {step + 1})"
    return parity, idle_ok


def _resumed(entry: Entry, wrapped: bool) -> tuple[Any, list[nn.Parameter]]:
    """Two steps, a torch.save/torch.load round trip into a fresh optimizer, two more steps."""

    def build(params: list[nn.Parameter]) -> Any:
        return _build(entry, params) if wrapped else _reference_on(entry, params)

    params = _params(entry)
    opt = build(params)
    for step in range(4):
        if step == 2:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            params = [nn.Parameter(p.detach().clone()) for p in params]
            opt = build(params)
            opt.load_state_dict(torch.load(buffer, weights_only=False))
        grads = _grads(step, params, 0)
        active = [g is not None and bool(g.any()) for g in grads]
        for p, g, a in zip(params, grads, active):
            p.grad = None if g is None or not (wrapped or a) else g.clone()
        _seed(step)
        if wrapped or any(active):
            opt.step()
    return opt, params


def _state_dict(entry: Entry) -> str:
    """Resumed from a state_dict, the wrapper goes on as the bare optimizer resumed the same way."""
    opt, params = _resumed(entry, wrapped=True)
    ref, ref_params = _resumed(entry, wrapped=False)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        _check(_equal(_copy(p), _copy(q)), f"param {i} differs from the bare optimizer's after a round trip")
        mine, theirs = _copy(_state_of(opt, p)), _copy(_state_of(ref, q))
        _check(
            _equal(mine, theirs) if theirs else _fresh(mine), f"param {i}'s state differs after a round trip"
        )
    return "yes"


def _freeze(entry: Entry) -> str:
    """A frozen parameter with a grad stays; unfrozen, it steps as the bare optimizer's does."""
    params = _params(entry)
    opt = _build(entry, params)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = _reference_on(entry, ref_params)
    opt.freeze(params[0])
    grads: list[Tensor | None] = [torch.ones_like(p) for p in params]
    before = [(params[0].grad, _copy(params[0]), None, _copy(_state_of(opt, params[0])))]
    for p, g in zip(params, grads):
        p.grad = g
    for i, (q, g) in enumerate(zip(ref_params, grads)):
        q.grad = None if i == 0 else g.clone()  # type: ignore[union-attr]  # some write into grads
    _seed(0)
    opt.step()
    _seed(0)
    ref.step()
    _check(_equal(_copy(params[0]), before[0][1]), "a frozen parameter moved")
    state = _copy(_state_of(opt, params[0]))
    _check(
        _equal(state, before[0][3]) if before[0][3] else _fresh(state), "a frozen parameter's state changed"
    )
    opt.unfreeze(params[0])
    for p, q in zip(params, ref_params):
        p.grad, q.grad = torch.full_like(p, 0.5), torch.full_like(q, 0.5)
    _seed(1)
    opt.step()
    _seed(1)
    ref.step()
    _parity(opt, ref, params, ref_params)
    return "yes"


def _nothing_active(entry: Entry) -> str:
    params = _params(entry)
    opt = _build(entry, params)
    _step_pair(opt, None, params, params, _grads(0, params, 0))
    idle, before = _step_pair(opt, None, params, params, [torch.zeros_like(p) for p in params])
    _idle_untouched(opt, params, idle, before)
    return "yes"


def _step_count(entry: Entry) -> str:
    params = _params(entry)
    opt = _build(entry, params)
    _step_pair(opt, None, params, params, _grads(0, params, 0))
    if any("step" in opt.state.get(p, {}) or "k" in opt.state.get(p, {}) for p in params):
        return "per param"
    for key in ("step", "k", "t", "steps", "train_step"):
        if any(isinstance(g.get(key), (int, float, Tensor)) for g in opt.param_groups):
            return "per group"
    return "none seen"


def _bare(entry: Entry) -> str:
    """Whether the optimizer alone moves a parameter whose grad is all zero: the ghost update."""
    params = _params(entry)
    opt = _reference_on(entry, params)
    value = None
    for step in range(len(SCHEDULE)):  # params[2]: a dense grad at step 3, an all-zero one at step 4
        for p, g in zip(params, _grads(step, params, 0)):
            p.grad = None if g is None else g.clone()
        value = _copy(params[2])
        _seed(step)
        opt.step()
    return "keeps idle" if _equal(_copy(params[2]), value) else "moves idle"


def _cell(check: Callable[[], str]) -> str:
    try:
        return check()
    except Failure as e:
        return f"no: {e}"
    except Exception as e:  # noqa: BLE001  # the matrix reports what breaks, it does not stop at it
        return f"no: raises {type(e).__name__}: {_short(e)}"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text[:90] + ("…" if len(text) > 90 else "")


def row(entry: Entry) -> dict[str, str]:
    """The matrix row of one optimizer: each column's verdict."""
    try:
        if entry.package != "torch":
            importlib.import_module(entry.name.rsplit(".", 1)[0])
        bare = entry.make(_params(entry))
    except Exception as e:  # noqa: BLE001
        return {"accepted": f"not available: {type(e).__name__}: {_short(e)}"}
    out = {"bare, zero grads": _cell(lambda: _bare(entry))}
    try:
        safeopt.wrap(bare)
    except (TypeError, ValueError) as e:
        return {**out, "accepted": f"refused: {_first_line(e)}"}  # the reason, whole
    out["accepted"] = "yes"
    both = _cell(lambda: "|".join(_run(entry, strict=False)))
    out["parity"], out["idle untouched"] = both.split("|") if "|" in both else (both, both)
    strict = _cell(lambda: "|".join(_run(entry, strict=True)))
    out["strict"] = "yes" if strict == "yes|yes" else strict.replace("|", "; ")
    out["state_dict"] = _cell(lambda: _state_dict(entry))
    out["freeze"] = _cell(lambda: _freeze(entry))
    out["nothing active"] = _cell(lambda: _nothing_active(entry))
    out["step count"] = _cell(lambda: _step_count(entry))
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: dict[str, dict[str, str]]) -> str:
    lines = [
        "# Compatibility matrix",
        "",
        "<!-- Generated by `python tests/compat_matrix.py`; tests/test_compat.py checks it is current. -->",
        "",
        "`safeopt.wrap(optimizer)` on the CPU, for the optimizers of torch.optim and of the packages",
        "in the `compat` extra (`pip install torch-safeopt[compat]`). Versions: torch "
        + torch.__version__.split("+")[0]
        + ", "
        + ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
        + ".",
        "",
        "Columns: **bare, zero grads**: whether the optimizer alone moves a parameter whose grad is",
        "all zero (the ghost update safeopt removes), built with the options `tests/compat_matrix.py`",
        "gives it: a learning rate and otherwise its defaults (`SGD` with `momentum=0.9`), so no weight",
        "decay and no momentum unless it is a default. Other options change the answer: `RMSprop` and",
        "`Adagrad`, which keep idle parameters here, move them with `weight_decay` (and `RMSprop` with",
        "`momentum`); **accepted**: `wrap()` takes it (or refuses it, saying why); **parity**: every",
        "parameter and its state bit-identical (`torch.equal`) to the bare optimizer given None for",
        "the inactive parameters (and not stepped when none is active; for torch-optimizer's",
        "`Lookahead`, whose sync visits every parameter it holds, to the bare optimizer holding only",
        "the parameters with a grad in each step); **idle untouched**: an",
        "inactive parameter, its grad (the same object) and its state are bit-identical after the",
        "step; **strict**: both again with `strict=True`; **state_dict**: resumed after a",
        "`torch.save`/`torch.load` round trip into a fresh wrapper, it goes on bit-identically to the",
        "bare optimizer resumed the same way; **freeze**: a frozen parameter",
        "with a grad stays, and moves once unfrozen; **nothing active**: a step with every grad",
        "zero raises nothing and touches nothing; **step count**: where the optimizer keeps its",
        "step counter (see [the rule](rule.md#optimizers-outside-torchoptim)).",
        "",
        "| optimizer | " + " | ".join(COLUMNS) + " |",
        "| --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for name, cells in rows.items():
        lines.append(f"| `{name}` | " + " | ".join(_md(cells.get(c, "")) for c in COLUMNS) + " |")
    holds = sum(all(cells.get(c) in HOLDS for c in COLUMNS[1:]) for cells in rows.values())
    ghosts = sum(cells.get(COLUMNS[0]) == "moves idle" for cells in rows.values())
    lines += [
        "",
        f"{len(rows)} optimizers: {ghosts} move a parameter whose grad is all zero when used alone; "
        f"wrapped, {holds} hold in every column; "
        + ", ".join(
            f"`{n}` is {c['accepted'].split(':')[0]}" for n, c in rows.items() if c.get("accepted") != "yes"
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def generate() -> str:
    return render({entry.name: row(entry) for entry in CATALOGUE})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with docs/compat.md instead of writing it"
    )
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if PAGE.read_text() != text:
            print("docs/compat.md is out of date: run python tests/compat_matrix.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - any failure of the generator is reported with exit code 2
        traceback.print_exc()
        sys.exit(2)
