"""The state safeopt keeps for an idle parameter (issue 20, items 3 and 4).

safeopt allocates torch's state for an idle parameter that has a grad (as torch's step on a zero
grad would), so checkpoints have the keys torch's have. That state must never show: a parameter's
first update is torch's first step with the settings of that moment, whatever happened while it
was idle (a learning rate change, amsgrad or momentum switched, a save and load); and a parameter
whose grad torch would refuse never makes a step fail while it is frozen or idle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import harness
import safeopt

SHAPES = [(3, 2), (4,)]

# (torch class, constructor kwargs, what changes while the second parameter is idle)
CHANGES: list[tuple[type, dict[str, Any], dict[str, Any]]] = [
    (torch.optim.Adam, {"lr": 0.1}, {"lr": 0.05, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.1}, {"lr": 0.05, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, {"lr": 0.05, "momentum": 0.5}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}, {"lr": 0.05}),
    (torch.optim.RMSprop, {"lr": 0.1}, {"lr": 0.05, "momentum": 0.9, "centered": True}),
    (torch.optim.Adagrad, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.Adadelta, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.Adamax, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.NAdam, {"lr": 0.1}, {"lr": 0.05, "momentum_decay": 0.002}),
    (torch.optim.RAdam, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.ASGD, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.Rprop, {"lr": 0.01}, {"lr": 0.005}),
]
TWINS = {torch.optim.Adam: safeopt.Adam, torch.optim.AdamW: safeopt.AdamW, torch.optim.SGD: safeopt.SGD}


def _id(case: tuple[type, dict[str, Any], dict[str, Any]]) -> str:
    cls, kwargs, change = case
    return f"{cls.__name__}-{'-'.join(k for k in kwargs if k != 'lr')}-to-{'-'.join(change)}"


def _makers(cls: type) -> list[tuple[str, Callable[..., torch.optim.Optimizer]]]:
    out: list[tuple[str, Callable[..., torch.optim.Optimizer]]] = [
        ("wrap", lambda params, **kw: safeopt.wrap(cls(params, **kw)))
    ]
    if cls in TWINS:
        out.append(("twin", TWINS[cls]))
        out.append(("rows", lambda params, **kw: TWINS[cls](params, lazy="rows", **kw)))
    return out


def _grads(params: list[nn.Parameter], step: int, idle: set[int]) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    return [
        torch.zeros_like(p) if i in idle else torch.randn(p.shape, generator=gen)
        for i, p in enumerate(params)
    ]


def _set(opt: torch.optim.Optimizer, change: dict[str, Any]) -> None:
    """Change settings the way a scheduler does: in the live param groups."""
    for group in opt.param_groups:
        group.update(change)


CASES = [(case, name) for case in CHANGES for name, _ in _makers(case[0])]


@pytest.mark.parametrize("reload", [False, True], ids=["uninterrupted", "saved-and-loaded"])
@pytest.mark.parametrize(("case", "maker"), CASES, ids=[f"{_id(c)}-{m}" for c, m in CASES])
def test_first_active_step_is_torchs_first_step_with_the_settings_of_that_moment(
    case: tuple[type, dict[str, Any], dict[str, Any]], maker: str, reload: bool
) -> None:
    """Parameter 1 has a zero grad (idle) in steps 0 and 1; the settings change; from step 2 it is
    active. torch steps only the active parameters: one torch optimizer per parameter, stepped
    when it is active (torch's fused SGD refuses a step where some parameters have a momentum
    buffer and some not)."""
    cls, kwargs, change = case
    make = dict(_makers(cls))[maker]
    mine_params = harness.make_params(SHAPES)
    ref_params = harness.make_params(SHAPES)
    mine = make([{"params": [p]} for p in mine_params], **kwargs)
    refs = [cls([q], **kwargs) for q in ref_params]
    for step in range(4):
        idle = {1} if step < 2 else set()
        if step == 2:  # a new lr for all, the other settings for the idle parameter's group only
            for opt, group in [(mine, 0), (refs[0], 0)]:
                opt.param_groups[group]["lr"] = change["lr"]
            _set(refs[1], change)
            mine.param_groups[1].update(change)
        for i, (p, q, g, ref) in enumerate(
            zip(mine_params, ref_params, _grads(mine_params, step, idle), refs)
        ):
            p.grad = g
            q.grad = g
            if i not in idle:
                ref.step()
        mine.step()
        if step == 1 and reload:
            saved = harness.roundtrip(mine.state_dict())
            mine = make([{"params": [p]} for p in mine_params], **kwargs)
            mine.load_state_dict(saved)
    for i, (p, q) in enumerate(zip(mine_params, ref_params)):
        assert harness.bit_equal(p.detach(), q.detach()), f"param {i}"
        harness.assert_state_equal(mine.state[p], refs[i].state[q], f"state of param {i}")


# --- issue 20.4: a frozen or idle parameter with a grad torch would refuse --------------------------


def _embedding_model() -> tuple[nn.Embedding, nn.Linear]:
    torch.manual_seed(0)
    return nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1)


def _backward(emb: nn.Embedding, lin: nn.Linear) -> None:
    lin(emb(torch.tensor([1, 2]))).sum().backward()


SPARSE_REFUSED = [
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.NAdam,
    torch.optim.Adamax,
    torch.optim.RAdam,
]


Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _sparse_makers() -> list[tuple[str, type, Maker]]:
    """(id, the torch class, a safeopt optimizer of it)."""
    out: list[tuple[str, type, Maker]] = [
        ("Adam-lazy", torch.optim.Adam, lambda ps: safeopt.Adam(ps, lr=0.1)),
        ("Adam-rows", torch.optim.Adam, lambda ps: safeopt.Adam(ps, lr=0.1, lazy="rows")),
        ("AdamW-rows", torch.optim.AdamW, lambda ps: safeopt.AdamW(ps, lr=0.1, lazy="rows")),
    ]
    for cls in SPARSE_REFUSED:
        out.append((f"wrap-{cls.__name__}", cls, lambda ps, cls=cls: safeopt.wrap(cls(ps, lr=0.1))))
    return out


SPARSE = _sparse_makers()


@pytest.mark.parametrize(("name", "cls", "make"), SPARSE, ids=[n for n, _, _ in SPARSE])
def test_a_frozen_sparse_embedding_never_makes_the_step_fail(name: str, cls: type, make: Maker) -> None:
    emb, lin = _embedding_model()
    ref_lin = nn.Linear(4, 1)
    ref_lin.load_state_dict(lin.state_dict())
    opt = make([*emb.parameters(), *lin.parameters()])
    ref = cls(ref_lin.parameters(), lr=0.1)
    opt.freeze(emb)  # type: ignore[attr-defined]  # safeopt's freeze API
    table = emb.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        ref.zero_grad()
        _backward(emb, lin)
        ref_lin(emb(torch.tensor([1, 2])).detach()).sum().backward()
        opt.step()
        ref.step()
    assert torch.equal(emb.weight, table)
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse  # the user's grad, untouched
    for p, q in zip(lin.parameters(), ref_lin.parameters()):
        assert harness.bit_equal(p.detach(), q.detach())


@pytest.mark.parametrize(("name", "cls", "make"), SPARSE, ids=[n for n, _, _ in SPARSE])
def test_an_idle_sparse_grad_never_makes_the_step_fail(name: str, cls: type, make: Maker) -> None:
    """A 1-d parameter with an all-zero sparse grad is idle (rows: no row is touched)."""
    bias = nn.Parameter(torch.ones(5))
    other = nn.Parameter(torch.ones(3))
    opt = make([bias, other])
    bias.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.zeros(2), (5,))
    other.grad = torch.ones(3)
    opt.step()
    assert torch.equal(bias, torch.ones(5)) and not torch.equal(other, torch.ones(3))


@pytest.mark.parametrize(("name", "cls", "make"), SPARSE, ids=[n for n, _, _ in SPARSE])
def test_an_active_sparse_grad_gets_torchs_error(name: str, cls: type, make: Maker) -> None:
    """A 1-d parameter (stepped whole also in a rows group) with a nonzero sparse grad."""
    bias = nn.Parameter(torch.ones(5))
    opt = make([bias])
    bias.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2), (5,))
    torch_opt = cls([nn.Parameter(torch.ones(5))], lr=0.1)
    torch_opt.param_groups[0]["params"][0].grad = bias.grad
    with pytest.raises(RuntimeError) as theirs:
        torch_opt.step()
    with pytest.raises(RuntimeError, match=str(theirs.value)):
        opt.step()
    assert torch.equal(bias, torch.ones(5))


@pytest.mark.parametrize("make", [safeopt.Adam, lambda ps, **kw: safeopt.wrap(torch.optim.Adam(ps, **kw))])
def test_a_frozen_complex_parameter_in_a_fused_adam_never_makes_the_step_fail(make: Any) -> None:
    z = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    w = nn.Parameter(torch.ones(3))
    opt = make([z, w], lr=0.1, fused=True)
    opt.freeze(z)
    z.grad = torch.ones(3, dtype=torch.complex64)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(z, torch.ones(3, dtype=torch.complex64)) and not torch.equal(w, torch.ones(3))


# --- the seam: which torch optimizers make a parameter's state at its first step ---------------------


def test_state_made_at_first_step_names_torchs_lazily_allocating_optimizers() -> None:
    """A canary for ``_torch_compat.state_made_at_first_step``: every optimizer it names has no
    state after construction, and ``step`` 1 after one update (so step 0 is state no update used)."""
    from safeopt._torch_compat import state_made_at_first_step

    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        builtin = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
        if not builtin or name in ("Optimizer", "LBFGS", "Muon"):  # no lr=0.1 alone, or 2-d only
            continue
        p = nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.1)
        if not state_made_at_first_step(opt):
            assert name in ("Adagrad", "SparseAdam", "Adafactor"), name
            continue
        assert not opt.state, name
        p.grad = torch.ones(3)
        opt.step()
        assert "step" not in opt.state[p] or float(opt.state[p]["step"]) == 1, name
    assert state_made_at_first_step(safeopt.Adam([nn.Parameter(torch.ones(1))]))
    assert not state_made_at_first_step(torch.optim.Adagrad([nn.Parameter(torch.ones(1))]))


# --- fresh state in state_dicts, copies and pickles ---------------------------------------------------


def _sgd_with_an_idle_parameter(make: Callable[..., torch.optim.Optimizer]) -> tuple[Any, list[nn.Parameter]]:
    params = harness.make_params(SHAPES)
    opt = make(params, lr=0.1, momentum=0.9, dampening=0.1)
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.zeros(4)
    opt.step()
    return opt, params


SGD_MAKERS = [safeopt.SGD, lambda ps, **kw: safeopt.wrap(torch.optim.SGD(ps, **kw))]


@pytest.mark.parametrize("make", SGD_MAKERS, ids=["twin", "wrap"])
def test_sgd_state_dict_has_a_placeholder_buffer_for_a_fresh_parameter(make: Any) -> None:
    """torch's SGD makes its buffer in the update; a state_dict gets what torch's step on a zero
    grad makes (zeros), listed in fresh_params, so that DCP has a key to load into."""
    opt, params = _sgd_with_an_idle_parameter(make)
    assert not opt.state[params[1]]  # live: nothing, as torch on the active parameters alone
    sd = opt.state_dict()
    assert sd["param_groups"][0]["fresh_params"] == [1]
    assert torch.equal(sd["state"][1]["momentum_buffer"], torch.zeros(4))
    assert torch.equal(sd["state"][0]["momentum_buffer"], opt.state[params[0]]["momentum_buffer"])
    assert "momentum_buffer" not in opt.state[params[1]]  # the live state is not changed

    other = make(params, lr=0.1, momentum=0.9, dampening=0.1)
    other.load_state_dict(harness.roundtrip(sd))
    assert not other.state[params[1]] and "fresh_params" not in other.param_groups[0]
    assert other.state_dict()["param_groups"][0]["fresh_params"] == [1]

    # A param group without momentum has no placeholders, and no key.
    plain = make(params, lr=0.1)
    assert "fresh_params" not in plain.state_dict()["param_groups"][0]


@pytest.mark.parametrize("make", SGD_MAKERS, ids=["twin", "wrap"])
def test_sgd_placeholder_that_torch_stepped_loads_back_as_a_real_buffer(make: Any) -> None:
    opt, params = _sgd_with_an_idle_parameter(make)
    torch_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1)
    torch_opt.load_state_dict(opt.state_dict())  # torch keeps the group key, and steps the placeholder
    params[1].grad = torch.ones(4)
    torch_opt.step()
    back = make(params, lr=0.1, momentum=0.9, dampening=0.1)
    back.load_state_dict(torch_opt.state_dict())
    harness.assert_state_equal(back.state[params[1]], torch_opt.state[params[1]], "stepped by torch")


# (the torch class, its arguments, the change after the copy, whether safeopt's twin runs it)
COPIED = [
    (torch.optim.Adam, {"lr": 0.1}, {"lr": 0.05, "amsgrad": True}, True),
    (torch.optim.Rprop, {"lr": 0.01}, {"lr": 0.005}, False),
]


@pytest.mark.parametrize("copy_", ["deepcopy", "pickle"])
@pytest.mark.parametrize(("cls", "kwargs", "change", "twin"), COPIED, ids=["Adam", "wrap-Rprop"])
def test_fresh_state_stays_fresh_through_deepcopy_and_pickle(
    cls: type, kwargs: dict[str, Any], change: dict[str, Any], twin: bool, copy_: str
) -> None:
    """The first update after the copy is torch's first step with the settings of then."""
    import copy
    import pickle

    params = harness.make_params(SHAPES)
    opt = TWINS[cls](params, **kwargs) if twin else safeopt.wrap(cls(params, **kwargs))
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.zeros(4)
    opt.step()
    other = copy.deepcopy(opt) if copy_ == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for group in other.param_groups:
        group.update(change)
    held = other.param_groups[0]["params"][1]
    ref = harness.make_params(SHAPES)[1]
    reference = cls([ref], **{**kwargs, **change})
    held.grad, ref.grad = torch.ones(4), torch.ones(4)
    other.step()
    reference.step()
    assert harness.bit_equal(held.detach(), ref.detach())
    harness.assert_state_equal(other.state[held], reference.state[ref], copy_)


def test_a_state_dict_from_torchs_own_method_loads_with_weights_only() -> None:
    """The mark on fresh state is a dict subclass; torch's state_dict() of a wrapped optimizer
    (which safeopt does not post-process) still saves only types torch.load accepts."""
    params = harness.make_params(SHAPES)
    inner = torch.optim.Adam(params, lr=0.1)
    opt = safeopt.wrap(inner)
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.zeros(4)
    opt.step()
    loaded = harness.roundtrip(inner.state_dict())  # weights_only=True
    assert float(loaded["state"][1]["step"]) == 0


def test_get_optimizer_state_dict_makes_a_momentum_buffer_key_for_every_parameter() -> None:
    """Issue 25.1 at its root: the state a new optimizer materialises for DCP has the keys a
    checkpoint of a trained one holds (torch.optim.SGD's: a momentum buffer per parameter)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    for make in SGD_MAKERS:
        osd = get_optimizer_state_dict(model, make(model.parameters(), lr=0.1, momentum=0.9))
        torch_osd = get_optimizer_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        assert osd["state"].keys() == torch_osd["state"].keys()
        for key, entry in osd["state"].items():
            assert torch.equal(entry["momentum_buffer"], torch_osd["state"][key]["momentum_buffer"]), key


def test_rows_first_update_after_idle_steps_is_torchs_first_step_with_the_settings_of_then() -> None:
    """lazy="rows": a table idle (zero grad, fresh state) while amsgrad is switched on and the lr
    halved; then two of its rows are active: they get torch's first step on those rows alone."""
    table = nn.Parameter(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    opt = safeopt.Adam([table], lr=0.1, lazy="rows")
    for _ in range(2):
        table.grad = torch.zeros(4, 2)
        opt.step()
    opt.param_groups[0].update(lr=0.05, amsgrad=True)
    grad = torch.zeros(4, 2)
    grad[[0, 2]] = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    table.grad = grad
    rows = nn.Parameter(table.detach()[[0, 2]].clone())
    reference = torch.optim.Adam([rows], lr=0.05, amsgrad=True)
    rows.grad = grad[[0, 2]]
    before = table.detach().clone()
    opt.step()
    reference.step()
    assert harness.bit_equal(table.detach()[[0, 2]], rows.detach())
    assert harness.bit_equal(table.detach()[[1, 3]], before[[1, 3]])
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert harness.bit_equal(opt.state[table][key][[0, 2]], reference.state[rows][key]), key


@pytest.mark.parametrize("make", [safeopt.Adam, lambda ps, **kw: safeopt.wrap(torch.optim.Adam(ps, **kw))])
def test_a_step_torch_refuses_keeps_the_fresh_state(make: Any) -> None:
    """Fresh state is dropped before a parameter's first update; when torch's step then raises,
    it is back: the failed step changed nothing."""
    bias = nn.Parameter(torch.ones(5))
    opt = make([bias], lr=0.1)
    bias.grad = torch.zeros(5)
    opt.step()
    fresh = opt.state[bias]
    bias.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2), (5,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt.state[bias] is fresh and float(fresh["step"]) == 0
    assert torch.equal(bias, torch.ones(5))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: safeopt.SGD(ps, lr=0.1, momentum=0.9, fused=True),
        lambda ps: safeopt.AdamW(ps, lr=0.1, fused=True),
    ],
    ids=["SGD-fused", "AdamW-fused"],
)
def test_a_step_torch_refuses_in_a_later_group_keeps_the_state_of_its_partial_update(make: Any) -> None:
    """torch steps groups one after another: refusing a later group (a complex parameter in a fused
    step) leaves the earlier groups updated. A parameter whose fresh state was dropped for that
    update keeps the state torch made with it, not the fresh state again (its next step would be
    taken as a first step, on a parameter that already moved)."""
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))
    c = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    q = torch.nn.Parameter(torch.tensor(2.0))
    opt = make([a, b])
    torch.optim.Optimizer.add_param_group(opt, {"params": [c]})  # torch refuses it when it steps
    ref = make([q])
    b.grad = torch.zeros(())
    opt.step()  # b idle: fresh state
    b.grad, q.grad = torch.ones(()), torch.ones(())
    c.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises((RuntimeError, NotImplementedError)):
        opt.step()
    ref.step()  # torch's update of b, the group before the refused one
    assert harness.bit_equal(b.detach(), q.detach())
    assert set(opt.state[b]) == set(ref.state[q])
    for key, value in ref.state[q].items():
        assert harness.bit_equal(opt.state[b][key], value), key


def test_a_parameter_held_twice_leaves_its_fresh_state_once() -> None:
    """Fresh state of a parameter held twice in a group (torch only warns) is dropped once at its
    first update: the step is torch's on the duplicate list."""
    p, q = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    with pytest.warns(UserWarning):
        opt = safeopt.SGD([p, p], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning):
        ref = torch.optim.SGD([q, q], lr=0.1, momentum=0.9)
    p.grad = torch.zeros(())
    opt.step()  # idle: fresh state
    p.grad, q.grad = torch.ones(()), torch.ones(())
    opt.step()
    ref.step()
    assert harness.bit_equal(p.detach(), q.detach())
    assert harness.bit_equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
