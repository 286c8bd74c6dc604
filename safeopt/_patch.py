"""safeopt.patch(): torch.optim.Adam, AdamW and SGD are safeopt's while it is in force.

``torch.optim.Adam`` (and ``torch.optim.adam.Adam``), ``AdamW`` and ``SGD`` are replaced by
classes of this module: safeopt's class (so the lazy rule applies), with a metaclass that also
counts the torch class's instances and subclasses as its own, so ``isinstance(opt,
torch.optim.AdamW)`` stays true for an optimizer built before the patch as for one built during
it. Code that looks the name up while the patch is in force (``from torch.optim import AdamW`` in
a script or in a library imported later, a framework calling ``torch.optim.AdamW(...)``) gets
the replacement; a name bound before keeps torch's class.

Every optimizer that steps is counted by a global step post-hook (torch's public API), and so are
the parameters safeopt's optimizers left idle in each step. ``wrap_all=True`` also wraps every
other optimizer built while the patch is in force: ``torch.optim.Optimizer.__init__`` is wrapped,
and an optimizer it built gets :func:`safeopt.wrap`'s step as its ``step`` (an instance
attribute: the object the caller holds stays the same, LR schedulers built later wrap that step).

``rows=PATTERN`` moves, when a replaced optimizer is built, every parameter whose qualified name
(``transformer.wte.weight``) matches the regular expression (``re.search``) into a new param group
after the others, with the same settings and ``lazy="rows"``. The names are the modules' at that
moment (:func:`safeopt._observe.module_names`: the live modules, found through the garbage
collector, so modules built before the patch count too); a parameter no module holds matches by
the name the optimizer was given (named parameters) or not at all.
"""

from __future__ import annotations

import abc
import importlib
import re
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from safeopt import _optimizers
from safeopt._lazy import LazyOptimizer
from safeopt._observe import module_names
from safeopt._rule import nonzero_flags
from safeopt._torch_compat import untraced
from safeopt._wrap import LazyWrapper, wrap

__all__ = ["SGD", "Adam", "AdamW", "Patch", "patch", "unpatch"]

_LOCK = threading.RLock()


class _EitherClass(abc.ABCMeta):
    """The metaclass of the replacements: torch's class's instances and subclasses count as the
    replacement's own, for the replacements themselves (``isinstance(torch_adamw, torch.optim.AdamW)``
    under the patch), not for a class a user derives from one (``class MyAdam(torch.optim.AdamW)``
    claims only its own instances). An ``abc.ABCMeta``, so that a subclass can also derive from
    ``abc.ABC``."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if super().__instancecheck__(obj):
            return True
        torch_cls = vars(cls).get("_torch_cls")
        return torch_cls is not None and isinstance(obj, torch_cls)

    def __subclasscheck__(cls, sub: type) -> bool:
        if super().__subclasscheck__(sub):
            return True
        torch_cls = vars(cls).get("_torch_cls")
        return torch_cls is not None and issubclass(sub, torch_cls)


def _prepare(params: Any) -> Any:
    """``params`` as the patch in force has them: with ``rows``, split (:func:`_split_rows`)."""
    session = _ACTIVE
    if session is not None and session.rows is not None:
        return _split_rows(params, session.rows)
    return params


class Adam(_optimizers.Adam, metaclass=_EitherClass):
    __doc__ = _optimizers.Adam.__doc__  # type: ignore[assignment]  # safeopt's docstring: a str, never None
    _torch_cls = torch.optim.Adam

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_prepare(params), *args, **kwargs)


class AdamW(_optimizers.AdamW, metaclass=_EitherClass):
    __doc__ = _optimizers.AdamW.__doc__  # type: ignore[assignment]  # safeopt's docstring: a str, never None
    _torch_cls = torch.optim.AdamW

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_prepare(params), *args, **kwargs)


class SGD(_optimizers.SGD, metaclass=_EitherClass):
    __doc__ = _optimizers.SGD.__doc__  # type: ignore[assignment]  # safeopt's docstring: a str, never None
    _torch_cls = torch.optim.SGD

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_prepare(params), *args, **kwargs)


_REPLACED: tuple[tuple[Any, str, type], ...] = (
    (torch.optim, "Adam", Adam),
    (torch.optim, "AdamW", AdamW),
    (torch.optim, "SGD", SGD),
    (importlib.import_module("torch.optim.adam"), "Adam", Adam),  # torch.optim does not export
    (importlib.import_module("torch.optim.adamw"), "AdamW", AdamW),  # its submodules by name
    (importlib.import_module("torch.optim.sgd"), "SGD", SGD),
)
for _cls in (Adam, AdamW, SGD):
    setattr(_cls, "__signature__", getattr(_cls.__mro__[1], "__signature__", None))  # noqa: B010  # read by inspect.signature
del _cls


def _tensor_of(item: Any) -> Tensor | None:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
        return item[1]
    return None


def _split_rows(params: Any, pattern: re.Pattern[str]) -> Any:
    """``params`` with the parameters whose name matches moved to ``lazy="rows"`` groups at the end."""
    if isinstance(params, Tensor):
        return params  # torch's own error names it
    groups = list(params)
    if not groups:
        return groups
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    listed = []
    for group in groups:
        if not isinstance(group, dict) or "params" not in group:
            return groups  # torch's own error names it
        ps = group["params"]
        listed.append([ps] if isinstance(ps, Tensor) else list(ps))
    tensors = [t for ps in listed for t in map(_tensor_of, ps) if t is not None]
    names = module_names(tensors)
    kept, moved = [], []
    for group, ps in zip(groups, listed):
        match = []
        for item in ps:
            t = _tensor_of(item)
            name = names.get(id(t)) if t is not None else None
            if name is None and isinstance(item, tuple) and isinstance(item[0], str):
                name = item[0]
            match.append(name is not None and pattern.search(name) is not None)
        kept.append({**group, "params": [x for x, m in zip(ps, match) if not m]})
        if any(match):
            moved.append({**group, "params": [x for x, m in zip(ps, match) if m], "lazy": "rows"})
    return kept + moved if moved else kept


_WRAPPER = "_safeopt_wrapper"


def _wrapped_step(self: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """The ``step`` of an optimizer that ``wrap_all`` wrapped: the wrapper's. A method of the
    optimizer itself, since an LR scheduler rebinds ``optimizer.step.__func__`` to the optimizer."""
    return vars(self)[_WRAPPER].step(closure)


class _Session:
    """What one patch does and saw, from patch() to unpatch()."""

    def __init__(self, rows: str | None, wrap_all: bool) -> None:
        self.rows_text = rows
        self.rows = None if rows is None else re.compile(rows)
        self.wrap_all = wrap_all
        self.active = False
        self.saved: list[tuple[Any, str, Any]] = []
        self.saved_init: Callable[..., None] | None = None
        self.handle: Any = None
        self.seen: weakref.WeakSet[Optimizer] = weakref.WeakSet()
        self.lazy: Counter[str] = Counter()  # class name -> optimizers that follow the lazy rule
        self.other: Counter[str] = Counter()  # class name -> optimizers that do not
        self.refused: dict[str, str] = {}  # class name -> why wrap_all could not wrap it
        self.steps = 0
        self.zero = 0  # parameter-steps skipped with an all-zero grad
        self.none = 0  # parameter-steps without a grad

    def start(self) -> None:
        session = self

        def step_hook(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            session._step(opt, args, kwargs)

        # Untraced: under a compiled step the hook runs as plain Python (a function, not a bound
        # method: torch.compiler.disable marks what it is given).
        self.handle = register_optimizer_step_post_hook(untraced(step_hook))
        for module, name, replacement in _REPLACED:
            self.saved.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)
        if self.wrap_all:
            original = Optimizer.__init__
            self.saved_init = original

            def __init__(opt: Optimizer, *args: Any, **kwargs: Any) -> None:
                original(opt, *args, **kwargs)
                if session.active and not isinstance(opt, (LazyOptimizer, LazyWrapper)):
                    session.wrap(opt)

            __init__.__wrapped__ = original  # type: ignore[attr-defined]  # as functools.wraps sets it
            Optimizer.__init__ = __init__  # type: ignore[method-assign,assignment]  # put back by unpatch()
        self.active = True

    def stop(self) -> None:
        self.active = False
        for module, name, value in reversed(self.saved):
            setattr(module, name, value)
        self.saved = []
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.saved_init is not None:
            Optimizer.__init__ = self.saved_init  # type: ignore[method-assign]  # torch's own again
            self.saved_init = None

    def wrap(self, opt: Optimizer) -> None:
        try:
            wrapper = wrap(opt)
        except (TypeError, ValueError) as e:
            self.refused[_class_name(type(opt))] = str(e).split(";")[0]
            return
        vars(opt)[_WRAPPER] = wrapper
        opt.step = types.MethodType(_wrapped_step, opt)  # type: ignore[method-assign]  # an instance attribute, as LR schedulers set

    def _step(self, opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # After the step: the grads it used are still there (safeopt never changes them), also those
        # a closure made inside it.
        lazy = isinstance(opt, (LazyOptimizer, LazyWrapper))
        with _LOCK:
            if opt not in self.seen:
                self.seen.add(opt)
                inner = opt.optimizer if isinstance(opt, LazyWrapper) else opt
                (self.lazy if lazy else self.other)[_class_name(type(inner))] += 1
            if not lazy:
                return
            self.steps += 1
        grads = [p.grad for group in opt.param_groups for p in group["params"]]
        plain = [g for g in grads if g is not None and type(g) in (Tensor, torch.nn.Parameter)]
        zero = nonzero_flags(plain).count(False) if plain else 0
        with _LOCK:
            self.none += sum(g is None for g in grads)
            self.zero += zero

    def summary(self) -> str:
        """What the patch replaced and what it saw, in a few lines."""
        lines = ["safeopt: torch.optim.Adam, AdamW and SGD were safeopt's" + self._settings()]
        if not self.lazy and not self.other:
            lines.append("  no optimizer stepped")
        if self.lazy:
            built = ", ".join(f"{name} x{n}" for name, n in sorted(self.lazy.items()))
            lines.append(f"  following safeopt's rule: {built} ({self.steps} step(s))")
            lines.append(
                f"  idle parameter-steps skipped: {self.zero} with an all-zero grad (torch.optim would "
                f"have moved them), {self.none} without a grad (torch.optim skips those too)"
            )
        if self.other:
            others = ", ".join(f"{name} x{n}" for name, n in sorted(self.other.items()))
            lines.append(
                f"  not replaced: {others}: torch's rule (an all-zero grad is still a step); give them "
                "safeopt's with safeopt.wrap(optimizer), or run with --wrap-all"
            )
        for name, why in sorted(self.refused.items()):
            lines.append(f"  --wrap-all could not wrap {name}: {why}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "replaced": ["torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"],
            "rows": self.rows_text,
            "wrap_all": self.wrap_all,
            "lazy": dict(sorted(self.lazy.items())),
            "other": dict(sorted(self.other.items())),
            "not_wrapped": dict(sorted(self.refused.items())),
            "steps": self.steps,
            "skipped_zero_grad": self.zero,
            "skipped_no_grad": self.none,
        }

    def _settings(self) -> str:
        parts = []
        if self.rows_text is not None:
            parts.append(f"rows={self.rows_text!r}")
        if self.wrap_all:
            parts.append("wrap_all=True")
        return f" ({', '.join(parts)})" if parts else ""


def _class_name(cls: type) -> str:
    if issubclass(cls, LazyOptimizer):
        return f"safeopt.{cls.__qualname__}"
    module = cls.__module__
    if module.startswith("torch.optim.") and getattr(torch.optim, cls.__name__, None) is not None:
        module = "torch.optim"
    return f"{module}.{cls.__qualname__}"


_ACTIVE: _Session | None = None


class Patch:
    """The result of :func:`patch`: a context manager that ends the patch it started.

    ``with safeopt.patch():`` ends the patch at the end of the block, unless it was already in
    force before (then the block leaves it as it found it). :meth:`summary` says what it
    replaced and what it saw, also after the end.
    """

    def __init__(self, session: _Session, started: bool) -> None:
        self._session = session
        self._started = started

    @property
    def active(self) -> bool:
        """Whether this patch is in force now."""
        return self._session.active

    def summary(self) -> str:
        """What was replaced, the optimizers that stepped, the idle parameter-steps skipped."""
        return self._session.summary()

    def as_dict(self) -> dict[str, Any]:
        """:meth:`summary` as a dict (``python -m safeopt run --json``): ``replaced``, ``rows``,
        ``wrap_all``, optimizers by class (``lazy``: following the rule; ``other``: not),
        ``not_wrapped`` (class: why), ``steps`` of the lazy ones, ``skipped_zero_grad`` and
        ``skipped_no_grad`` parameter-steps."""
        return self._session.as_dict()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            with _LOCK:
                if _ACTIVE is self._session:
                    unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<safeopt.patch{self._session._settings()}: {state}>"


def patch(*, rows: str | None = None, wrap_all: bool = False) -> Patch:
    """Make ``torch.optim.Adam``, ``AdamW`` and ``SGD`` safeopt's until :func:`unpatch`.

    For code you would rather not edit (a framework that builds ``torch.optim.AdamW`` itself):
    code that looks the class up while the patch is in force, ``torch.optim.AdamW(...)`` or
    ``from torch.optim import AdamW``, builds safeopt's, which takes the same arguments;
    ``isinstance(opt, torch.optim.AdamW)`` stays true. A name bound before the patch (``from
    torch.optim import AdamW`` run earlier) keeps torch's class. Other optimizers are counted
    when they step and listed by :meth:`Patch.summary`.

    Args:
        rows: A regular expression; each parameter whose qualified name (``model.named_parameters()``
            of the outermost module holding it, e.g. ``transformer.wte.weight``) it matches
            (``re.search``) goes, when a replaced optimizer is built, into a param group of its own
            with the same settings and ``lazy="rows"``, after the other groups. The names are those
            of the modules alive at that moment.
        wrap_all: Also give every other ``torch.optim.Optimizer`` built while the patch is in
            force the lazy rule: its ``step`` becomes :func:`safeopt.wrap`'s (the object stays
            the same). One that ``wrap()`` refuses (LBFGS) is left as it is and listed.

    Returns:
        A :class:`Patch`. A plain call patches until :func:`unpatch`; ``with safeopt.patch():``
        until the end of the block. Calling it again with the same arguments does nothing more;
        with other arguments while a patch is in force raises ``ValueError``. Thread-safe.

    Example:
        ```python
        with safeopt.patch():
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
            trainer.train()  # its torch.optim.AdamW is safeopt.AdamW
        ```
    """
    global _ACTIVE
    if rows is not None:
        if not isinstance(rows, str):
            raise TypeError(f"rows must be a regular expression (str) or None, got {type(rows).__name__}")
        try:
            re.compile(rows)
        except re.error as e:
            raise ValueError(f"rows={rows!r} is not a regular expression: {e}") from None
    if not isinstance(wrap_all, bool):
        raise TypeError(f"wrap_all must be True or False, got {wrap_all!r}")
    with _LOCK:
        if _ACTIVE is not None:
            if (_ACTIVE.rows_text, _ACTIVE.wrap_all) != (rows, wrap_all):
                raise ValueError(
                    f"safeopt.patch(rows={rows!r}, wrap_all={wrap_all}) conflicts with the patch in force, "
                    f"safeopt.patch(rows={_ACTIVE.rows_text!r}, wrap_all={_ACTIVE.wrap_all}); call "
                    "safeopt.unpatch() first"
                )
            return Patch(_ACTIVE, started=False)
        session = _Session(rows, wrap_all)
        session.start()
        _ACTIVE = session
        return Patch(session, started=True)


def unpatch() -> None:
    """End the patch in force, if any: ``torch.optim`` gets its own classes back.

    Optimizers built meanwhile stay safeopt's (wrapped ones stay wrapped).
    """
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is not None:
            _ACTIVE.stop()
            _ACTIVE = None
