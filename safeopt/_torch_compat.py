"""The places where safeopt leans on torch.optim internals.

Everything else in safeopt uses public API only: the names of torch's instance attributes and
state keys, the signatures of private helpers, the hook wrapper, the fused kernels' ``found_inf``
and the casts of ``load_state_dict`` are all named here, and each has a canary in
``tests/test_torch_compat.py`` that fails, naming the torch version, when a release changes it.
Where one can, a seam falls back to documented behaviour.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import torch
from torch import Tensor

__all__ = [
    "ADAM_LISTS",
    "HOOK_DICTS",
    "INSTANCE_ATTRS",
    "MOMENTUM_BUFFER",
    "STEP",
    "ByIdentity",
    "allocate_state",
    "batches",
    "capture_health_check",
    "enter_select_step_floats",
    "fused_adam_kernel",
    "fused_adam_options",
    "gather",
    "init_group",
    "leave_select_step_floats",
    "saved_as_is",
    "settle",
    "skip_flag",
    "skips_by_found_inf",
    "state_made_at_first_step",
    "torch_step_fn",
    "twin",
    "unhooked",
    "untraced",
    "without_grad_mode",
    "writes_into_grads",
]

#: What ``Optimizer.__init__`` (and ``GradScaler`` after it) keep on an optimizer instance: its
#: groups, state and defaults, torch's per-instance hook dicts, and the attributes through which
#: ``GradScaler`` hands a fused step its scale and inf flag. ``wrap()`` makes its wrapper share
#: every one of them with the optimizer it wraps.
HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
INSTANCE_ATTRS = (
    "param_groups",
    "state",
    "defaults",
    *HOOK_DICTS,
    "_step_supports_amp_scaling",
    "grad_scale",
    "found_inf",
)

#: State keys of torch's Adam, AdamW and SGD that safeopt reads: the per-parameter step count
#: (Adam, AdamW) and the momentum buffer (SGD; absent until a parameter's first step).
STEP = "step"
MOMENTUM_BUFFER = "momentum_buffer"


def saved_as_is(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], key: str, dtype: torch.dtype
) -> None:
    """Put ``key`` of each parameter's loaded state back as it was saved, in ``dtype``.

    ``Optimizer.load_state_dict`` casts every floating state tensor except ``step`` to its
    parameter's dtype (``_process_value_according_to_param_policy``): right for moments, wrong
    for a count kept beside them (a bfloat16 count stops at 256).
    """
    saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_state = state_dict.get("state", {})
    for saved_id, p in zip(saved_ids, params):
        saved = saved_state.get(saved_id)
        if saved and key in saved and key in optimizer.state.get(p, ()):
            optimizer.state[p][key] = saved[key].to(dtype=dtype, device=p.device)


_F = TypeVar("_F", bound=Callable[..., Any])


# The eager shortcut of ``untraced`` on the torches it was tested on (2.11, 2.13, 2.14). On torch
# 2.6, dynamo tracing the shortcut's wrapper reads the frame callback and crashed the interpreter
# (a compiled ``opt.step()`` under ``python -m safeopt watch``); older torches take the disabled
# call every time, as before the shortcut.
EAGER_SHORTCUT = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 11)


def untraced(fn: _F) -> _F:
    """``fn`` as a call that dynamo (``torch.compile``) runs without tracing it: a clean graph
    break, without the warnings that tracing safeopt's host decision logs (a ``bool()`` of a
    tensor, ctypes reads) and without the view of the param groups that dynamo gives torch's own
    optimizers (``capturable=True``). ``torch._disable_dynamo`` is ``torch.compiler.disable``
    imported at the first call, not at safeopt's import (torch.optim's constructor imports
    torch._dynamo anyway); where a torch lacks it, ``fn`` as it is. Called from eager code with no
    frame callback set (``get_eval_frame_callback``), ``fn`` runs directly: the disabled call would
    only set and reset that callback (``tests/test_cost.py``)."""
    disable = getattr(torch, "_disable_dynamo", None)
    if disable is None:
        return fn
    disabled = disable(fn)
    # Where a torch lacks either (get_eval_frame_callback is not in every release), the disabled
    # call every time, as before.
    frames = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    callback = getattr(frames, "get_eval_frame_callback", None)
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if callback is None or compiling is None or not EAGER_SHORTCUT:
        return cast(_F, disabled)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        # Eager, no frame callback set (no compiled region running): the disabled call would only
        # set and reset that callback around fn, about half a microsecond a call, several calls a
        # step. Dynamo tracing this reads is_compiling() as True and takes the disabled call.
        if not compiling() and callback() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    return cast(_F, call)


def _float_specializations() -> set[str] | None:
    """dynamo's record of the float inputs it must specialize (``TensorifyState``, private), the
    set itself; ``None`` on a torch without it."""
    module = sys.modules.get("torch._dynamo.symbolic_convert")
    record = getattr(getattr(module, "TensorifyState", None), "force_specializations", None)
    return record if isinstance(record, set) else None


# A string in dynamo's warn_once cache, which ``torch._dynamo.reset()`` empties (private): where it
# is missing dynamo was reset since it was put there.
_NOT_RESET = "safeopt: torch._dynamo.reset() not called since this was added"
_GENERATION = [0]


def _dynamo_generation() -> int:
    """How many times safeopt saw dynamo reset: a record kept with another value names symbols of
    a compilation dynamo has forgotten. On a torch without the cache every call counts as a reset:
    no record is kept from one step to the next (more restarts of analysis, the same graphs)."""
    cache = getattr(sys.modules.get("torch._dynamo.utils"), "warn_once_cache", None)
    if not isinstance(cache, set) or _NOT_RESET not in cache:
        _GENERATION[0] += 1
        if isinstance(cache, set):
            cache.add(_NOT_RESET)
    return _GENERATION[0]


@untraced  # a graph break: it runs between the frames dynamo compiles, none under way on this thread
def enter_select_step_floats(optimizer: torch.optim.Optimizer) -> None:
    """Give the compiled step's select frame (``_compiled.step``) of ``optimizer`` its own record of
    the float inputs dynamo must specialize (``TensorifyState``, private), keeping the record of
    the other frames aside until :func:`leave_select_step_floats`.

    dynamo keeps that record for the restarts of one frame's compilation, but clears it only on
    some of them, so it outlives the frame: a float that one frame of safeopt's step read and did
    not use (a param group's ``lr``, read with the groups before the compiled step's graph break)
    is specialized there, and the frame after the break, whose symbol for the same value has the
    same name, then specialized it too, and compiled again for every new learning rate (an LR
    scheduler) where torch's own compiled step makes it a dynamic input. Cleared at every step
    instead, the record cost a restart of analysis at each recompilation, of this frame (a foreach
    step, which compiles per lr as torch's does) and of the user's frames after it. With a record
    of its own, per optimizer (as dynamo compiles the frame per optimizer; another optimizer's
    symbols may have the same names), forgotten at ``torch._dynamo.reset()``, the select frame
    sees what it recorded itself, as torch's step frame does, and the other frames see theirs. A
    torch without it: nothing to do."""
    record = _float_specializations()
    if record is None:
        return
    _OTHER_FLOATS.clear()
    _OTHER_FLOATS.update(record)
    record.clear()
    own = _SELECT_STEP_FLOATS.get(optimizer)
    if own is not None and own[0] == _dynamo_generation():  # else dynamo was reset since
        record.update(own[1])


@untraced  # a graph break: the select frame's compilation is over
def leave_select_step_floats(optimizer: torch.optim.Optimizer) -> None:
    """After the select frame: keep what it recorded for its next compilation, and put back the
    other frames' record (:func:`enter_select_step_floats`)."""
    record = _float_specializations()
    if record is None:
        return
    _SELECT_STEP_FLOATS.set(optimizer, (_dynamo_generation(), frozenset(record)))
    record.clear()
    record.update(_OTHER_FLOATS)
    _OTHER_FLOATS.clear()


def unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``step`` without the hook wrapper that ``Optimizer.__init__`` installs.

    torch wraps ``type(optimizer).step`` once per class so that step pre/post hooks
    (the optimizer's own and the global ones) run around it. A safeopt optimizer's
    ``step`` already carries that wrapper, so calling torch's wrapped ``step`` from
    inside it would run every hook twice. torch marks the wrapper with ``hooked``,
    and ``functools.wraps`` keeps the original under ``__wrapped__``.
    """
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined,no-any-return]  # set by functools.wraps
    return step


@untraced  # dynamo cannot set attributes on an object it did not make (torch 2.11)
def twin(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> Any:
    """A shallow copy of ``optimizer`` for torch's step to run on, with param groups of its own.

    torch's ``step()`` reads the optimizer through ``self`` only: ``self.param_groups`` to visit,
    ``self.state``, ``self.defaults``, GradScaler's ``grad_scale`` and ``found_inf``. The twin
    shares every attribute with ``optimizer`` except ``param_groups``: copies of ``groups``,
    whose ``params`` the caller sets to what the step should visit. Other threads reading the
    optimizer during the step (``state_dict()``) see its groups whole. :func:`settle` gives the
    optimizer what the step set on the twin.

    One twin per optimizer, its groups the same dicts from step to step, refreshed each time:
    torch.compile guards a compiled step on the optimizer it was given, and a new twin every
    step would compile torch's step again every step. Kept by the optimizer's identity
    (:class:`ByIdentity`), whatever its class's ``__eq__`` and ``__hash__``.
    """
    made = _TWINS.get(optimizer)
    if made is None or type(made) is not type(optimizer) or len(made.param_groups) != len(groups):
        made = object.__new__(type(optimizer))
        vars(made)["param_groups"] = [{} for _ in groups]
        _TWINS.set(optimizer, made)
    own = vars(made)
    shadows = own["param_groups"]
    own.clear()
    own.update(vars(optimizer))
    own["param_groups"] = shadows
    for shadow, group in zip(shadows, groups):
        shadow.clear()
        shadow.update(group)
    return made


_V = TypeVar("_V")


class ByIdentity(Generic[_V]):
    """A value kept per object, keyed by the object's identity and dropped when it is collected.

    A ``WeakKeyDictionary`` keys by ``__hash__`` and ``__eq__``, which a subclass may define: two
    optimizers equal by their class's ``__eq__`` would share one value (stepped from two threads,
    each would rewrite what the other reads), one with a hash that changes would miss its value
    and leave a new entry each time, and one without a hash could not be a key. Keyed by ``id``
    with a weak reference, none of that matters: the reference's callback drops the entry when
    the object goes, before its ``id`` can be reused. Nothing is stored on the object itself, so
    pickling, ``copy.deepcopy`` and ``state_dict`` never see it.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[Any], _V]] = {}

    def get(self, obj: object) -> _V | None:
        entry = self._entries.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        return entry[1]

    def set(self, obj: object, value: _V) -> None:
        key, entries = id(obj), self._entries

        def drop(ref: weakref.ref[Any]) -> None:  # holds the key and the dict, not the object
            if entries.get(key, (None,))[0] is ref:
                entries.pop(key, None)

        entries[key] = (weakref.ref(obj, drop), value)

    def __len__(self) -> int:
        return len(self._entries)


_TWINS: ByIdentity[Any] = ByIdentity()
_MISSING = object()


@untraced  # the same, for what the step set on the twin
def settle(
    optimizer: torch.optim.Optimizer,
    copy: Any,
    groups: list[dict[str, Any]],
    own: tuple[str, ...] = (),
) -> None:
    """Give ``optimizer`` the attributes a step set on its :func:`twin` (torch's fused SGD clears
    ``_need_device_dtype_check_for_fused``, the graph check sets ``_warned_capturable_if_run_uncaptured``)
    and the group keys other than ``params`` it wrote; ``own`` names the caller's attributes.
    ``groups`` are the ones the twin was made from. The twin then holds nothing until the next
    step: not a parameter, and nothing that may refer back to the optimizer (a step hook that
    holds it), which would keep it alive through ``_TWINS``."""
    mine, theirs = vars(optimizer), vars(copy)
    shadows = theirs["param_groups"]
    theirs["param_groups"] = mine["param_groups"]
    for name in own:
        if name in theirs:
            theirs[name] = mine.get(name, _MISSING)
    if not _same(theirs, mine):
        for name, value in theirs.items():
            if value is not _MISSING and mine.get(name, _MISSING) is not value:
                mine[name] = value
    for group, shadow, real in zip(groups, shadows, optimizer.param_groups):
        shadow["params"] = group["params"]
        if not _same(shadow, group):
            for key, value in shadow.items():
                if group.get(key, _MISSING) is not value:
                    real[key] = value
        shadow.clear()
    theirs.clear()
    theirs["param_groups"] = shadows


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two dicts hold the same (or equal) values. ``==`` on dicts compares values by
    identity first, in C: the usual case (the step set nothing) costs no Python loop. A value
    that is another object is compared with ``==``, which a tensor of several elements cannot
    answer: then they differ, and the caller compares one by one."""
    try:
        return a == b
    except Exception:  # noqa: BLE001  # a tensor's ==: treated as a difference, checked one by one
        return False


# By optimizer class. A plain dict rather than functools.cache: torch.compile traces
# allocate_state, and dynamo warns about (and ignores) lru_cache wrappers it meets.
_OUTPUTS: dict[type, tuple[str, ...] | None] = {}


def _init_group_outputs(cls: type) -> tuple[str, ...] | None:
    """The names of the arguments after ``group`` in ``cls._init_group(self, group, ...)``, or None."""
    if cls not in _OUTPUTS:
        _OUTPUTS[cls] = _signature_outputs(cls)
    return _OUTPUTS[cls]


def _signature_outputs(cls: type) -> tuple[str, ...] | None:
    init = getattr(cls, "_init_group", None)
    if init is None:
        return None
    try:
        outputs = list(inspect.signature(init).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    if not all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in outputs):
        return None
    return tuple(p.name for p in outputs)


def _init_group_args(group: dict[str, Any], outputs: tuple[str, ...]) -> list[Any]:
    """A fresh list per output; an argument named after a group option gets its value.

    Every output is a list torch appends to, except in torch 2.6's ``AdamW._init_group``, which
    takes ``amsgrad`` between its lists (from torch 2.7 AdamW is Adam's subclass, without it).
    """
    return [group[name] if name in _GROUP_OPTION_ARGS and name in group else [] for name in outputs]


_GROUP_OPTION_ARGS = frozenset({"amsgrad"})  # tests/test_torch_compat.py checks no other option appears


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
    outputs = _init_group_outputs(type(optimizer))
    if not params or outputs is None:
        return
    view = dict(group)
    view["params"] = params
    with torch.no_grad():
        type(optimizer)._init_group(optimizer, view, *_init_group_args(view, outputs))  # type: ignore[attr-defined]  # private, per class


# torch's optimizers whose ``_init_group`` makes all of a parameter's state (step 0, zeros, the
# settings of that moment) the first time it sees the parameter with a grad. Adagrad is not
# among them: its constructor makes its state.
_FIRST_STEP_CLASSES = (
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adadelta",
    "Adamax",
    "NAdam",
    "RAdam",
    "ASGD",
    "Rprop",
)


def state_made_at_first_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of torch's optimizers (or a subclass keeping their
    ``_init_group``) that make a parameter's state at its first step, so that state with
    ``step`` 0 is state no update has used: torch's step counts 1 at a parameter's first update.
    """
    init = getattr(type(optimizer), "_init_group", None)
    return init is not None and any(
        init is getattr(getattr(torch.optim, name, None), "_init_group", None) for name in _FIRST_STEP_CLASSES
    )


def writes_into_grads(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]
) -> bool:
    """Whether torch's step for this group would modify the grads in place.

    torch's foreach SGD with nesterov momentum, no weight decay and no maximize adds
    the momentum buffer into the caller's grads (``_foreach_add_(device_grads, ...)``),
    and foreach is torch's default on CUDA. safeopt promises that ``step()`` leaves
    grads as they were, so for such groups it hands torch copies of the grads.
    """
    if not isinstance(optimizer, torch.optim.SGD) or not params:
        return False
    if group["momentum"] == 0 or not group["nesterov"] or group["maximize"] or group["weight_decay"] != 0:
        return False
    if group.get("fused"):
        return False
    foreach = group.get("foreach")
    if foreach is None:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, group.get("differentiable", False), use_fused=False)
    return bool(foreach)


def batches(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], active: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The active parameters of a group, in as many torch steps as torch can take them.

    One batch, except for fused SGD with momentum: torch's ``_fused_sgd`` treats a
    step as "first" only when *no* parameter has a momentum buffer yet, and raises
    a TypeError when some have one and some do not. That mix is ordinary under the
    lazy rule (a parameter whose first nonzero grad comes late), so safeopt steps
    the two kinds separately; each is then exactly torch's update for it.
    """
    if not (isinstance(optimizer, torch.optim.SGD) and group.get("fused") and group["momentum"] != 0):
        return [active]
    # Walk the state once by items: looking each parameter up would hash it in Python.
    with_buffer = {id(p) for p, state in optimizer.state.items() if state.get("momentum_buffer") is not None}
    started = [p for p in active if id(p) in with_buffer]
    if not started or len(started) == len(active):
        return [active]
    return [started, [p for p in active if id(p) not in with_buffer]]


def skips_by_found_inf(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether torch's step for this group skips its whole update on the device when the
    optimizer's ``found_inf`` attribute is a tensor holding 1.

    GradScaler's protocol for fused optimizers: torch's fused Adam, AdamW and SGD read
    ``found_inf`` (and ``grad_scale``) from the optimizer, their kernels return before touching
    anything when it is 1, and Adam's ``step`` count, incremented before the kernel, is
    decremented by it. ``tests/test_torch_compat.py`` checks that a call with 1 changes
    nothing and a call with 0 equals a call without it.
    """
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and bool(
        group.get("fused")
    )


def skip_flag(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The flag, on the device, of a step that torch's fused kernels skip: the ``found_inf`` a
    GradScaler set on the optimizer, compared as the kernels compare it (``== 1``: a sum of 2 over
    two devices, or 0.5, does not skip). None when no ``found_inf`` is set. Reads nothing."""
    found_inf = getattr(optimizer, "found_inf", None)
    if not isinstance(found_inf, torch.Tensor):
        return None
    return found_inf == 1


#: The lists torch's ``Adam._init_group`` (and ``AdamW``'s) fills, by argument name, in the order
#: torch's fused kernels take them.
ADAM_LISTS = ("params_with_grad", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def gather(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, list[Any]] | None:
    """torch's ``_init_group`` run on ``params`` (each with a grad): their state created as torch
    creates it (with torch's errors), and the lists torch's step would hand its functional, by
    argument name. None when the class has no ``_init_group`` safeopt understands."""
    outputs = _init_group_outputs(type(optimizer))
    if outputs is None:
        return None
    view = dict(group)
    view["params"] = params
    args = _init_group_args(view, outputs)
    with torch.no_grad():
        type(optimizer)._init_group(optimizer, view, *args)  # type: ignore[attr-defined]  # private, per class
    return {name: arg for name, arg in zip(outputs, args) if isinstance(arg, list)}


def _torch_steps() -> tuple[Callable[..., Any], ...]:
    return tuple(unhooked(cls.step) for cls in (torch.optim.Adam, torch.optim.AdamW))


def fused_adam_kernel(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Callable[..., None] | None:
    """torch's fused Adam or AdamW kernel (``torch._fused_adam_`` / ``_fused_adamw_``) that
    torch's own step would call for this group, or None when the step is not torch's own fused
    Adam/AdamW step with plain hyperparameters (then only torch's whole step gives its answer).

    The kernel updates each tensor of its lists on its own and skips the whole call on the device
    when ``found_inf`` holds 1; ``torch.optim.adam._fused_adam`` advances the step counts by one
    before it and takes ``found_inf`` off them after. ``tests/test_torch_compat.py`` checks that
    ``gather`` + the kernel with ``fused_adam_options`` and that step bookkeeping equals torch's step, bit for bit.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or group.get("fused") is not True:
        return None
    if group.get("differentiable") or any(isinstance(b, torch.Tensor) for b in group["betas"]):
        return None
    # The step the optimizer runs: the first class in its MRO, past safeopt's, that defines one.
    step = next(
        (
            vars(cls)["step"]
            for cls in type(optimizer).__mro__
            if "step" in vars(cls) and cls.__module__.partition(".")[0] != "safeopt"
        ),
        None,
    )
    if step is None or unhooked(step) not in _torch_steps():
        return None
    outputs = _init_group_outputs(type(optimizer))
    if outputs is None or not set(ADAM_LISTS) <= set(outputs):
        return None
    # torch 2.7+ keeps decoupled_weight_decay in every Adam/AdamW group; torch 2.6's AdamW is its own class.
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    return torch._fused_adamw_ if decoupled else torch._fused_adam_


def fused_adam_options(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of torch's fused Adam kernel for this group but ``lr``, ``grad_scale``
    and ``found_inf``, as ``torch.optim.adam._fused_adam`` passes them. A call is then
    ``kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=...,
    grad_scale=..., found_inf=..., **options)``, the lists of one device and dtype."""
    beta1, beta2 = group["betas"]
    return {
        "amsgrad": group["amsgrad"],
        "beta1": beta1,
        "beta2": beta2,
        "weight_decay": group["weight_decay"],
        "eps": group["eps"],
        "maximize": group["maximize"],
    }


def capture_health_check(optimizer: torch.optim.Optimizer) -> None:
    """What torch's step checks first: capture of a group without ``capturable`` raises, a
    capturable step run outside capture on an accelerator warns once. torch 2.13 renamed the
    method (the old name is a deprecated alias); an optimizer with neither is not checked."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check", None
    )
    if check is not None:
        check()


# --- torch.compile: torch's step traced by dynamo (safeopt/_compiled.py) ---------------------------


def torch_step_fn(optimizer: torch.optim.Optimizer, step: Callable[..., Any]) -> Callable[..., Any] | None:
    """``step`` when it is torch's own ``Adam.step`` or ``AdamW.step`` (hooks off), ``optimizer``
    one of those classes and its ``_init_group`` torch's (what :func:`init_group` calls); else None."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or step not in _torch_steps():
        return None
    return step if _adam_init_outputs(optimizer) is not None else None


def without_grad_mode(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``step`` without its ``_use_grad_for_differentiable`` wrapper, which sets grad mode
    and breaks dynamo's graph on either side of the step; ``step`` itself when it has none."""
    inner = getattr(step, "__wrapped__", None)
    if inner is not None and getattr(getattr(step, "__code__", None), "co_name", "") == "_use_grad":
        return inner  # type: ignore[no-any-return]  # set by functools.update_wrapper
    return step


# By class, read at import: read while dynamo traces, a cache filled at the first step would be
# guarded on and compile the step again at the second.
_ADAM_INIT_OUTPUTS = {cls: _signature_outputs(cls) for cls in (torch.optim.Adam, torch.optim.AdamW)}


def _adam_init_outputs(optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """The outputs of ``optimizer``'s ``_init_group`` when it is torch's Adam's or AdamW's."""
    init = getattr(type(optimizer), "_init_group", None)
    # Compared with the classes' attributes as they are now: dynamo replaces every torch.optim
    # class's _init_group with a disabled wrapper of it when it first compiles.
    for cls, outputs in _ADAM_INIT_OUTPUTS.items():  # a loop: torch 2.6's dynamo takes no next(it, default)
        if init is cls._init_group:
            return outputs if outputs is not None and set(ADAM_LISTS) <= set(outputs) else None
    return None


def init_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[list[Tensor]] | None:
    """torch's ``_init_group`` on one of ``optimizer``'s own groups, for torch's own Adam and AdamW:
    state for each of its parameters with a grad, made as torch makes it, and for each such
    parameter the tensors torch's step updates (the parameter, its ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with amsgrad, and ``step``). None for any other ``_init_group``.

    Called as a method of the optimizer, as torch's step calls it: while tracing, dynamo runs it
    (its ``OptimizerVariable``) and hands the traced code the state it made, so that nothing
    compiles again when the state appears. The tensors come from its lists, not from
    ``optimizer.state``, which dynamo would read as it was before the call."""
    outputs = _adam_init_outputs(optimizer)
    if outputs is None:
        return None
    args = _init_group_args(group, outputs)
    optimizer._init_group(group, *args)  # type: ignore[attr-defined]  # private, per class
    named = dict(zip(outputs, args))
    params, _, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = (named[name] for name in ADAM_LISTS)
    if not group["amsgrad"]:
        return [[p, m, v, s] for p, m, v, s in zip(params, exp_avgs, exp_avg_sqs, steps)]
    return [[p, m, v, mx, s] for p, m, v, mx, s in zip(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)]


# The compiled step's select frame's own record of floats to specialize, per optimizer, with
# the dynamo generation it was kept in (_dynamo_generation), and the record of every other
# frame while the select frame's is in place.
_SELECT_STEP_FLOATS: ByIdentity[tuple[int, frozenset[str]]] = ByIdentity()
_OTHER_FLOATS: set[str] = set()
