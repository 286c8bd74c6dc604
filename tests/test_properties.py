"""Property tests: a hypothesis state machine runs safeopt and torch side by side.

Each run draws an optimizer case (every configuration of torch's ``optim_db``,
as a safeopt twin or through ``safeopt.wrap``), a dtype, a model of 1-6 tiny
parameters (0-d, empty and non-contiguous ones among them) in one or two param
groups, and ``lazy``. Its rules step with a drawn grad kind per parameter,
freeze and unfreeze every kind of target, step inside ``opt.frozen(...)``, and
checkpoint through ``state_dict()`` / ``torch.save`` / ``torch.load`` /
``load_state_dict()`` into a new optimizer.

The frozen flags are modelled here, never read back from the optimizer. After
every step, inactive parameters (by ``harness.expected_active``), their grads
and their state are bit-identical to before; active ones and their state are
bit-identical to torch stepping only the active parameters (the reference: the
torch class over clones of the parameters, inactive ones with ``grad=None``).
Between steps, every parameter and its state agree with the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest
import torch
from hypothesis import assume, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from torch import Tensor, nn

import cases
import harness
import safeopt
from safeopt import _rule
from safeopt._torch_compat import allocate_state

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)

# A parameter is a view of a base tensor: "plain" (the base itself), "transposed"
# (base.t(), dense but not contiguous) or "strided" (base[:, ::2], not even dense).
PLAIN_SHAPES = ((), (0,), (2, 0), (1,), (3,), (2, 3), (2, 1, 2))
VIEWS = {
    "plain": lambda t: t,
    "transposed": lambda t: t.t(),
    "strided": lambda t: t[:, ::2],
}


@st.composite
def recipes(draw: Any) -> tuple[str, tuple[int, ...]]:
    """(view, shape of the base tensor) for one parameter."""
    view = draw(st.sampled_from(tuple(VIEWS)))
    if view == "plain":
        return view, draw(st.sampled_from(PLAIN_SHAPES))
    rows, cols = draw(st.integers(2, 3)), draw(st.integers(2, 3))
    return view, (rows, cols) if view == "transposed" else (rows, 2 * cols)


@dataclasses.dataclass
class GroupSpec:
    members: list[int]  # indices into the model's parameters, in group order
    name: str | None
    lazy: bool | None  # the group's own "lazy" key; None leaves it to the constructor
    lr: float | None  # a group-specific lr, so that groups step differently

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.lr is not None:
            out["lr"] = self.lr
        return out


class OptimizerMachine(RuleBasedStateMachine):
    """safeopt against the torch reference on one drawn configuration."""

    device = "cpu"

    @staticmethod
    def all_cases() -> list[cases.Case]:
        return _cpu_cases()

    # -- setup --------------------------------------------------------------------------

    @initialize(data=st.data())
    def setup(self, data: Any) -> None:
        # Half the runs use a safeopt twin; the others wrap() a torch class, every class equally likely.
        self.via = data.draw(st.sampled_from(("twin", "wrap")), label="via")
        by_class = _by_class(self.all_cases(), twins_only=self.via == "twin")
        assume(by_class)
        torch_cls = data.draw(st.sampled_from(sorted(by_class, key=lambda c: c.__name__)), label="class")
        self.case: cases.Case = data.draw(st.sampled_from(by_class[torch_cls]), label="case")
        self.dtype: torch.dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        self.strict = self.via == "wrap" and data.draw(st.booleans(), label="strict")
        self.lazy: bool = data.draw(st.booleans(), label="lazy")
        # torch's differentiable step updates leaves in place: autograd refuses it for leaves requiring grad.
        self.requires_grad = self.case.impl != "differentiable"
        note(
            f"case {self.case.id} via {self.via} (strict={self.strict}), {self.dtype}, lazy={self.lazy}, "
            f"device {self.device}"
        )

        shapes = data.draw(st.lists(recipes(), min_size=1, max_size=6), label="parameters")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        bases = harness.make_params(
            [shape for _, shape in shapes], self.dtype, seed=seed, device=self.device, requires_grad=False
        )
        self.views = [view for view, _ in shapes]
        self.base_shapes = [shape for _, shape in shapes]
        self.params = [self._param(view, base.detach()) for view, base in zip(self.views, bases)]
        self.ref_params = [self._param(view, base.detach().clone()) for view, base in zip(self.views, bases)]
        for p, q, view in zip(self.params, self.ref_params, self.views):
            assert p.stride() == q.stride()
            if view != "plain":
                assert not p.is_contiguous(), f"the {view} parameter of shape {tuple(p.shape)} is contiguous"
        self.strides = [p.stride() for p in self.params]

        n = len(self.params)
        split = data.draw(st.integers(0, n - 1), label="second group starts at (0: one group)")
        ranges = [range(n)] if split == 0 else [range(split), range(split, n)]
        tensor_lr = isinstance(self.case.kwargs.get("lr"), Tensor)
        self.specs = [
            GroupSpec(
                members=list(r),
                name=data.draw(st.sampled_from(cases.GROUP_NAMES), label=f"group {g} name"),
                lazy=data.draw(st.sampled_from((None, True, False)), label=f"group {g} lazy"),
                lr=None
                if g == 0 or tensor_lr
                else data.draw(st.sampled_from((None, 0.05)), label="group 1 lr"),
            )
            for g, r in enumerate(ranges)
        ]
        self.group_of = {i: g for g, spec in enumerate(self.specs) for i in spec.members}
        self.pos_of = {i: pos for spec in self.specs for pos, i in enumerate(spec.members)}
        # Fixed for the whole run: a checkpoint carries each group's "lazy".
        self.group_lazy = [self.lazy if spec.lazy is None else spec.lazy for spec in self.specs]

        assume(self._torch_can_step())  # fused or Adafactor with complex, Adafactor with empty params

        self.group_frozen = [False] * len(self.specs)
        self.param_frozen: set[int] = set()
        self.opt = self._make_safe(self.lazy)
        self.ref = self._make_torch(self.ref_params)
        self.steps = 0

    def _param(self, view: str, base: Tensor) -> nn.Parameter:
        return nn.Parameter(VIEWS[view](base), requires_grad=self.requires_grad)

    def _copy(self, i: int, value: Tensor) -> nn.Parameter:
        """A new parameter laid out like parameter ``i`` (a view of its own base), holding ``value``."""
        base = torch.zeros(self.base_shapes[i], dtype=self.dtype, device=self.device)
        out = self._param(self.views[i], base)
        with torch.no_grad():
            out.copy_(value)
        assert out.stride() == self.params[i].stride()
        return out

    def _groups(self, params: list[Tensor], *, lazy_keys: bool) -> list[dict[str, Any]]:
        """Fresh param-group dicts (torch's constructor writes its defaults into them)."""
        out = []
        for spec in self.specs:
            group = {"params": [params[i] for i in spec.members], **spec.options()}
            if lazy_keys and spec.lazy is not None:
                group["lazy"] = spec.lazy
            out.append(group)
        return out

    def _make_safe(self, lazy: bool) -> torch.optim.Optimizer:
        groups = self._groups(self.params, lazy_keys=True)
        if self.via == "twin":
            return self.case.twin(groups, **self.case.kwargs, lazy=lazy)
        return safeopt.wrap(self.case.make_torch(groups), lazy=lazy, strict=self.strict)

    def _make_torch(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return self.case.make_torch(self._groups(params, lazy_keys=False))

    def _torch_can_step(self) -> bool:
        """Whether torch itself steps this model with every parameter that can ever be active."""
        params = [self._copy(i, p.detach()) for i, p in enumerate(self.params)]
        gen = torch.Generator().manual_seed(0)
        try:
            opt = self._make_torch(params)
            never_active = [
                i for i, p in enumerate(params) if p.numel() == 0 and self.group_lazy[self.group_of[i]]
            ]
            for _ in range(2):
                for i, p in enumerate(params):
                    p.grad = None if i in never_active else self._grad(p, "dense", gen, like_param=False)
                opt.step()
            # safeopt gives an idle parameter with a grad torch's state (and torch's refusals:
            # fused kernels refuse complex parameters) without stepping it.
            for i in never_active:
                params[i].grad = torch.zeros_like(params[i])
                allocate_state(opt, opt.param_groups[self.group_of[i]], [params[i]])
        except Exception as e:  # noqa: BLE001 - any refusal by torch rules the configuration out
            note(f"torch cannot step this configuration: {type(e).__name__}: {e}")
            return False
        return True

    # -- the model of the flags -----------------------------------------------------------

    def frozen(self, i: int) -> bool:
        return self.group_frozen[self.group_of[i]] or i in self.param_frozen

    def group_is_frozen(self, g: int) -> bool:
        return self.group_frozen[g] or all(i in self.param_frozen for i in self.specs[g].members)

    def draw_target(self, data: Any) -> tuple[Any, set[int], set[int], str]:
        """A freeze target: (target, whole groups it names, parameters it names, description)."""
        kind = data.draw(st.sampled_from(cases.TARGET_KINDS), label="target kind")
        n, n_groups = len(self.params), len(self.specs)
        names = sorted({spec.name for spec in self.specs if spec.name is not None})
        if kind == "group_name" and not names:
            kind = "group_index"
        if kind == "param":
            i = data.draw(st.integers(0, n - 1), label="param")
            return self.params[i], set(), {i}, f"param {i}"
        if kind in ("list", "tuple", "generator", "module"):
            chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n + 1), label="params")
            selected = [self.params[i] for i in chosen]
            if kind == "list":
                target: Any = selected
            elif kind == "tuple":
                target = tuple(selected)
            elif kind == "generator":
                target = (p for p in selected)
            else:
                target = nn.Module()
                target.held = nn.ParameterList(selected)
                if data.draw(st.booleans(), label="module also holds a foreign parameter"):
                    target.foreign = nn.Parameter(torch.zeros(2, device=self.device))
            return target, set(), set(chosen), f"{kind} of params {chosen}"
        if kind == "group_index":
            g = data.draw(st.integers(0, n_groups - 1), label="group")
            return g, {g}, set(), f"group {g}"
        if kind == "group_negative_index":
            g = data.draw(st.integers(-n_groups, -1), label="group")
            return g, {g % n_groups}, set(), f"group {g}"
        if kind == "group_name":
            name = data.draw(st.sampled_from(names), label="group name")
            found = {g for g, spec in enumerate(self.specs) if spec.name == name}
            return name, found, set(), f"group(s) named {name!r}"
        g = data.draw(st.integers(0, n_groups - 1), label="group")
        return self.opt.param_groups[g], {g}, set(), f"group dict {g}"

    # -- rules ----------------------------------------------------------------------------

    @rule(data=st.data())
    def step(self, data: Any) -> None:
        self._step(data, "step")

    @rule(data=st.data())
    def step_with_closure(self, data: Any) -> None:
        """The grads come from the closure: the decision is taken after it ran, once."""
        self._step(data, "step(closure)", closure=True)

    @rule(data=st.data())
    def freeze(self, data: Any) -> None:
        target, groups, members, what = self.draw_target(data)
        note(f"freeze({what})")
        self.opt.freeze(target)
        for g in groups:
            self.group_frozen[g] = True
        self.param_frozen |= members

    @rule(data=st.data())
    def unfreeze(self, data: Any) -> None:
        target, groups, members, what = self.draw_target(data)
        note(f"unfreeze({what})")
        if any(self.group_frozen[self.group_of[i]] for i in members):
            with pytest.raises(ValueError, match="whole group is frozen"):
                self.opt.unfreeze(target)
            return  # refused: nothing changes
        self.opt.unfreeze(target)
        for g in groups:
            self.group_frozen[g] = False
        self.param_frozen -= members

    @rule(data=st.data())
    def step_inside_frozen(self, data: Any) -> None:
        target, groups, members, what = self.draw_target(data)
        note(f"with frozen({what}): step")
        saved = list(self.group_frozen), set(self.param_frozen)
        with self.opt.frozen(target):
            for g in groups:
                self.group_frozen[g] = True
            self.param_frozen |= members
            self.check_flags()
            self._step(data, f"step inside frozen({what})")
        self.group_frozen, self.param_frozen = saved  # the invariants check that the optimizer agrees

    @rule(flip_lazy=st.booleans())
    def save_load(self, flip_lazy: bool) -> None:
        """Checkpoint into a new optimizer over the same parameters; it carries on from there."""
        state_dict = self.opt.state_dict()
        for g, group in enumerate(state_dict["param_groups"]):
            spec = self.specs[g]
            assert group["frozen"] == self.group_frozen[g], f"state_dict group {g} frozen"
            assert list(group["frozen_params"]) == sorted(
                self.pos_of[i] for i in spec.members if i in self.param_frozen
            ), f"state_dict group {g} frozen_params"
            assert group["lazy"] == self.group_lazy[g], f"state_dict group {g} lazy"
        # The new optimizer's own default differs with flip_lazy: "lazy" must come from the checkpoint.
        new = self._make_safe(self.lazy ^ flip_lazy)
        new.load_state_dict(harness.roundtrip(state_dict, weights_only=False))
        self.opt = new
        ref = self._make_torch(self.ref_params)
        ref.load_state_dict(harness.roundtrip(self.ref.state_dict(), weights_only=False))
        self.ref = ref

    # -- the step and its checks ----------------------------------------------------------

    def _grad(self, p: Tensor, kind: str, gen: torch.Generator, *, like_param: bool) -> Tensor | None:
        # make_grad writes through .view(-1), which needs a contiguous template.
        template = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        grad = harness.make_grad(template, kind, gen)
        if grad is not None and like_param:
            grad = torch.empty_like(p.detach()).copy_(grad)  # the parameter's strides where it is dense
        return grad

    def _step(self, data: Any, label: str, *, closure: bool = False) -> None:
        n = len(self.params)
        kinds = data.draw(
            st.lists(st.sampled_from(harness.GRAD_KINDS), min_size=n, max_size=n), label="grad kinds"
        )
        like_param = data.draw(st.booleans(), label="grads laid out like their params")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="grad seed"))
        grads = [self._grad(p, kind, gen, like_param=like_param) for p, kind in zip(self.params, kinds)]
        for i, kind in enumerate(kinds):
            # A zero grad in a lazy group may come as a ZeroTensor: no storage, so never read raw.
            # (In a lazy=False group torch steps it, and some of torch's kernels refuse it.)
            if (
                kind == "zero"
                and self.group_lazy[self.group_of[i]]
                and data.draw(st.booleans(), label=f"param {i}: the zero grad is a ZeroTensor")
            ):
                grads[i] = torch._efficientzerotensor(
                    self.params[i].shape, dtype=self.dtype, device=self.device
                )
        calls: list[bool] = []  # grad mode of each call of the closure
        loss = torch.tensor(float(self.steps))

        def set_grads() -> Tensor:
            calls.append(torch.is_grad_enabled())
            for p, grad in zip(self.params, grads):
                p.grad = grad
            return loss

        set_grads()
        active = [
            harness.expected_active(
                grad if grad is None else grad.clone(),  # a ZeroTensor's clone has storage to read
                self.frozen(i),
                self.group_lazy[self.group_of[i]],
            )
            for i, grad in enumerate(grads)
        ]
        note(f"{label} {self.steps}: grads {kinds}, active {active}")
        before = harness.snapshot(self.opt, self.params)
        had_state = [bool(self.opt.state.get(p)) for p in self.params]

        if closure:
            for p in self.params:  # what the closure replaces: stale grads the decision must not see
                p.grad = None if data.draw(st.booleans(), label="stale grad is None") else torch.ones_like(p)
            calls.clear()
            assert self.opt.step(set_grads) is loss, "step(closure) does not return the closure's loss"
            assert calls == [True], f"closure calls (grad mode of each): {calls}; expected one, with grad"
        else:
            assert self.opt.step() is None
        harness.reference_step(self.ref, self.ref_params, grads, active)

        what = f"{self.case.id} {self.dtype} {label} {self.steps}"
        self.steps += 1
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            assert p.grad is grad, f"{what}: the grad of param {i} was replaced"
            # Active ones too: safeopt hands torch copies where torch would write into them.
            assert grad is None or harness.bit_equal(grad, before[i][1]), (
                f"{what}: the grad of param {i} changed"
            )
        inactive = [i for i, a in enumerate(active) if not a]
        harness.assert_unchanged(before, self.opt, self.params, inactive, what)
        harness.assert_matches_reference(
            self.opt, self.params, self.ref, self.ref_params, [i for i, a in enumerate(active) if a], what
        )
        for i in inactive:
            if grads[i] is not None and not had_state[i]:
                self._check_allocation(i, what)

    def _check_allocation(self, i: int, what: str) -> None:
        """An idle parameter with a grad gets torch's state (keys, dtypes, shapes, devices), fresh."""
        p = self.params[i]
        mine = self.opt.state.get(p, {})
        probe_param = self._copy(i, p.detach())
        spec = self.specs[self.group_of[i]]
        probe = self.case.make_torch([{"params": [probe_param], **spec.options()}])
        probe_param.grad = p.grad.clone()
        try:
            probe.step()
        except Exception:  # noqa: BLE001 - torch cannot step it alone (Adafactor, empty parameter)
            return
        theirs = probe.state[probe_param]
        if "step" in theirs:  # torch's _init_group made the state; an idle parameter gets it too
            assert set(mine) == set(theirs), (
                f"{what}: idle param {i} state {sorted(mine)}, torch {sorted(theirs)}"
            )
        for key, value in mine.items():
            assert key in theirs, f"{what}: idle param {i} has state[{key!r}], which torch never makes"
            other = theirs[key]
            assert isinstance(value, Tensor) == isinstance(other, Tensor), f"{what}: state[{key!r}] type"
            if isinstance(value, Tensor):
                assert (value.dtype, value.shape, value.device) == (other.dtype, other.shape, other.device), (
                    f"{what}: idle param {i} state[{key!r}] is {value.dtype} {tuple(value.shape)} on "
                    f"{value.device}; torch makes {other.dtype} {tuple(other.shape)} on {other.device}"
                )

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def check_flags(self) -> None:
        for i, p in enumerate(self.params):
            assert self.opt.is_frozen(p) == self.frozen(i), f"is_frozen(param {i})"
        for g in range(len(self.specs)):
            assert self.opt.is_frozen(g) == self.group_is_frozen(g), f"is_frozen(group {g})"
        everything = all(self.frozen(i) for i in range(len(self.params)))
        assert self.opt.is_frozen(list(self.params)) == everything, "is_frozen(all params)"

    @invariant()
    def agrees_with_reference(self) -> None:
        """Every parameter and its state equal the reference's (or are fresh where torch has none)."""
        harness.assert_matches_reference(
            self.opt,
            self.params,
            self.ref,
            self.ref_params,
            range(len(self.params)),
            f"{self.case.id} at rest",
        )
        assert [p.stride() for p in self.params] == self.strides, "a parameter changed its layout"


def _by_class(all_cases: list[cases.Case], *, twins_only: bool) -> dict[type, list[cases.Case]]:
    out: dict[type, list[cases.Case]] = {}
    for case in all_cases:
        if case.twin is not None or not twins_only:
            out.setdefault(case.torch_cls, []).append(case)
    return out


@functools.cache
def _cpu_cases() -> list[cases.Case]:
    return cases.cases()


TestOptimizerMachine = OptimizerMachine.TestCase
TestOptimizerMachine.settings = settings(parent=settings.default)


def _leans_on_torch_internals(case: cases.Case) -> bool:
    """The configurations where safeopt works around torch (safeopt/_torch_compat.py) or torch's
    state is not per-element: fused SGD with momentum (stepped in two batches), foreach SGD with
    nesterov (writes into the grads), Adagrad (state made in __init__), Adafactor (factored state)."""
    sgd = case.torch_cls is torch.optim.SGD
    return (
        (sgd and case.impl == "fused" and bool(case.kwargs.get("momentum")))
        or (sgd and case.impl == "foreach" and bool(case.kwargs.get("nesterov")))
        or case.torch_cls in (torch.optim.Adagrad, torch.optim.Adafactor)
    )


class SeamsMachine(OptimizerMachine):
    """The same machine on the configurations that random draws over all of optim_db rarely reach."""

    @staticmethod
    def all_cases() -> list[cases.Case]:
        return [c for c in _cpu_cases() if _leans_on_torch_internals(c)]


TestSeamsMachine = SeamsMachine.TestCase
TestSeamsMachine.settings = settings(
    parent=settings.default, max_examples=max(5, settings.default.max_examples // 4)
)


@functools.cache
def _capturable_cpu_cases() -> list[cases.Case]:
    """The fused Adam and AdamW cases with ``capturable=True``, which torch accepts on the CPU: the
    step that decides on the device and reads nothing on the host (``safeopt/_capturable.py``)."""
    out = []
    for case in _cpu_cases():
        if case.impl != "fused" or case.torch_cls not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        kwargs = {**case.kwargs, "capturable": True}
        try:
            case.torch_cls([nn.Parameter(torch.zeros(2))], **kwargs)
        except (ValueError, RuntimeError):
            continue
        out.append(dataclasses.replace(case, kwargs=kwargs, impl="fused_capturable"))
    return out


class CapturableMachine(OptimizerMachine):
    """The capturable step (per-parameter skips on the device) against torch."""

    @staticmethod
    def all_cases() -> list[cases.Case]:
        return _capturable_cpu_cases()


class DeviceDecisionMachine(OptimizerMachine):
    """Every configuration with the eager decision made as on an accelerator (``_device``
    kernels, flags read once or twice per device) instead of the CPU's memory probe."""

    def __init__(self) -> None:
        super().__init__()
        _rule.FORCE_DEVICE = True

    def teardown(self) -> None:
        _rule.FORCE_DEVICE = False


_QUARTER = settings(parent=settings.default, max_examples=max(5, settings.default.max_examples // 4))
TestCapturableMachine = CapturableMachine.TestCase
TestCapturableMachine.settings = _QUARTER
TestDeviceDecisionMachine = DeviceDecisionMachine.TestCase
TestDeviceDecisionMachine.settings = _QUARTER


@functools.cache
def _cuda_cases() -> list[cases.Case]:
    # On CUDA, optim_db adds the capturable configurations (and fused where torch has it).
    return cases.cases("cuda")


class CudaOptimizerMachine(OptimizerMachine):
    device = "cuda"

    @staticmethod
    def all_cases() -> list[cases.Case]:
        return _cuda_cases()


class CapturableCudaOptimizerMachine(OptimizerMachine):
    device = "cuda"

    @staticmethod
    def all_cases() -> list[cases.Case]:
        return [c for c in _cuda_cases() if c.kwargs.get("capturable")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "machine", [CudaOptimizerMachine, CapturableCudaOptimizerMachine], ids=["all", "capturable"]
)
def test_cuda_machine(machine: type[OptimizerMachine]) -> None:
    profile = settings.default
    smaller = settings(parent=profile, max_examples=max(5, profile.max_examples // 4))
    run_state_machine_as_test(machine, settings=smaller)


@pytest.mark.parametrize("torch_cls", [torch.optim.NAdam, torch.optim.ASGD], ids=lambda c: c.__name__)
def test_checkpoint_keeps_fresh_state_as_torch_makes_it(torch_cls: type) -> None:
    """An idle parameter with a grad gets torch's fresh state, with float32 scalars (NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``) whatever the parameter's dtype. torch's
    load_state_dict would cast those to the parameter's dtype; torch, which never allocated them,
    allocates them afresh at the first update. safeopt's load drops untouched fresh state so that
    the first update after a checkpoint is torch's."""
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    ref_w = nn.Parameter(w.detach().clone())
    opt = safeopt.wrap(torch_cls([w], foreach=False))
    ref = torch_cls([ref_w], foreach=False)
    w.grad = torch.zeros_like(w)  # idle: safeopt allocates torch's fresh state; the reference has grad None
    opt.step()
    opt2 = safeopt.wrap(torch_cls([w], foreach=False))
    opt2.load_state_dict(harness.roundtrip(opt.state_dict(), weights_only=False))
    ref2 = torch_cls([ref_w], foreach=False)
    ref2.load_state_dict(harness.roundtrip(ref.state_dict(), weights_only=False))
    grad = torch.tensor([0.3, -0.7], dtype=torch.float64)
    w.grad, ref_w.grad = grad, grad.clone()
    opt2.step()
    ref2.step()
    harness.assert_matches_reference(
        opt2, [w], ref2, [ref_w], [0], f"{torch_cls.__name__} after a checkpoint"
    )
