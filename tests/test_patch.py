"""safeopt.patch() and unpatch(): what is replaced and put back, isinstance, idempotence, conflicts,
the context manager, threads, ``rows=`` and ``wrap_all=``, each step equal to safeopt's by hand."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import safeopt
from harness import bit_equal
from safeopt import _patch

NAMES = [
    (torch.optim, "Adam"),
    (torch.optim, "AdamW"),
    (torch.optim, "SGD"),
    (importlib.import_module("torch.optim.adam"), "Adam"),
    (importlib.import_module("torch.optim.adamw"), "AdamW"),
    (importlib.import_module("torch.optim.sgd"), "SGD"),
]
ORIGINAL = {(m.__name__, n): getattr(m, n) for m, n in NAMES}
INIT = torch.optim.Optimizer.__init__


def current() -> dict[tuple[str, str], type]:
    return {(m.__name__, n): getattr(m, n) for m, n in NAMES}


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    safeopt.unpatch()
    yield
    safeopt.unpatch()
    assert current() == ORIGINAL and torch.optim.Optimizer.__init__ is INIT


def test_patch_replaces_the_six_names_and_unpatch_puts_torchs_back() -> None:
    p = safeopt.patch()
    assert p.active
    assert {v.__name__ for v in current().values()} == {"Adam", "AdamW", "SGD"}
    assert all(v.__module__ == "safeopt._patch" for v in current().values())
    from torch.optim import AdamW  # looked up during the patch: safeopt's

    assert issubclass(AdamW, safeopt.AdamW)
    safeopt.unpatch()
    assert current() == ORIGINAL and not p.active


def test_patch_and_unpatch_are_idempotent() -> None:
    first = safeopt.patch()
    replaced = current()
    second = safeopt.patch()
    assert current() == replaced and second.active
    safeopt.unpatch()
    safeopt.unpatch()
    assert current() == ORIGINAL and not first.active and not second.active


def test_isinstance_of_torchs_name_holds_for_old_and_new_optimizers() -> None:
    p = nn.Parameter(torch.ones(2))
    old = torch.optim.AdamW([p])
    with safeopt.patch():
        new = torch.optim.AdamW([p])
        assert isinstance(new, torch.optim.AdamW) and isinstance(new, safeopt.AdamW)
        assert isinstance(old, torch.optim.AdamW) and not isinstance(old, safeopt.AdamW)
        assert issubclass(ORIGINAL[("torch.optim", "AdamW")], torch.optim.AdamW)
        assert not isinstance(torch.optim.SGD([p]), torch.optim.Adam)
    assert isinstance(new, torch.optim.AdamW) and isinstance(old, torch.optim.AdamW)


def test_a_second_patch_with_other_settings_is_refused_and_changes_nothing() -> None:
    safeopt.patch()
    replaced = current()
    with pytest.raises(ValueError, match=r"conflicts with the patch in force.*safeopt\.unpatch\(\) first"):
        safeopt.patch(rows="embed")
    with pytest.raises(ValueError, match="conflicts"):
        safeopt.patch(wrap_all=True)
    assert current() == replaced and torch.optim.Optimizer.__init__ is INIT


def test_bad_arguments_change_nothing() -> None:
    with pytest.raises(ValueError, match=r"rows='\(' is not a regular expression"):
        safeopt.patch(rows="(")
    with pytest.raises(TypeError, match="wrap_all must be True or False"):
        safeopt.patch(wrap_all=1)  # type: ignore[arg-type]
    assert current() == ORIGINAL


def test_the_context_manager_restores_torchs_classes() -> None:
    with safeopt.patch() as p:
        assert torch.optim.Adam is _patch.Adam
    assert current() == ORIGINAL and not p.active
    with pytest.raises(RuntimeError), safeopt.patch():
        raise RuntimeError
    assert current() == ORIGINAL


def test_a_block_inside_a_plain_patch_leaves_it_in_force() -> None:
    outer = safeopt.patch()
    with safeopt.patch():
        pass
    assert outer.active and torch.optim.AdamW is _patch.AdamW
    with safeopt.patch():
        safeopt.unpatch()  # ended inside the block: the block's end does nothing more
    assert current() == ORIGINAL


def test_patch_from_many_threads_at_once() -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(50):
                safeopt.patch()
                seen = set(current().values())
                # Whole: all six names safeopt's, or (another thread ended it) all torch's.
                assert seen <= {_patch.Adam, _patch.AdamW, _patch.SGD} or seen <= set(ORIGINAL.values())
                if i % 2:
                    safeopt.unpatch()
        except BaseException as e:  # noqa: BLE001  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    safeopt.unpatch()
    assert current() == ORIGINAL


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)

    def loss(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        h = self.body(self.embed(ids))
        return h.pow(2).mean() + (0.0 if step % 2 else 1.0) * self.branch(h).mean()


def train(net: Net, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    torch.manual_seed(1)
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        net.loss(torch.randint(0, 3, (5,)), step).backward()  # rows 3..9 never looked up
        opt.step()


def twins() -> tuple[Net, Net]:
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def test_patched_adamw_steps_as_safeopt_by_hand() -> None:
    a, b = twins()
    with safeopt.patch() as p:  # steps are counted while the patch is in force
        opt = torch.optim.AdamW(a.parameters(), lr=0.1, weight_decay=0.1)
        train(a, opt)
    train(b, safeopt.AdamW(b.parameters(), lr=0.1, weight_decay=0.1))
    assert all(bit_equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert "safeopt.AdamW x1 (6 step(s))" in p.summary()
    assert "6 with an all-zero grad" in p.summary()  # branch.weight and .bias, every other step
    assert p.as_dict()["skipped_zero_grad"] == 6


def test_rows_moves_the_matching_parameters_into_a_rows_group() -> None:
    a, b = twins()
    with safeopt.patch(rows=r"^embed\."):
        opt = torch.optim.Adam(
            [{"params": [a.embed.weight, a.body.weight]}, {"params": [a.body.bias], "lr": 0.05}], lr=0.1
        )
    held = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert held == [[id(a.body.weight)], [id(a.body.bias)], [id(a.embed.weight)]]
    assert [g["lazy"] for g in opt.param_groups] == [True, True, "rows"]
    assert opt.param_groups[2]["lr"] == 0.1
    hand = safeopt.Adam(
        [
            {"params": [b.body.weight]},
            {"params": [b.body.bias], "lr": 0.05},
            {"params": [b.embed.weight], "lazy": "rows"},
        ],
        lr=0.1,
    )
    start = a.embed.weight.detach().clone()
    for _ in range(4):
        for o, net in ((opt, a), (hand, b)):
            o.zero_grad(set_to_none=False)
            net.body(net.embed(torch.tensor([0, 1]))).pow(2).mean().backward()
            o.step()
    assert all(bit_equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert bit_equal(a.embed.weight.detach()[2:], start[2:])  # rows never looked up: untouched
    assert not bit_equal(a.embed.weight.detach()[:2], start[:2])


def _takes_named_parameters() -> bool:
    try:
        torch.optim.SGD([("w", nn.Parameter(torch.ones(1)))], lr=0.1)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


@pytest.mark.skipif(
    not _takes_named_parameters(), reason=f"torch {torch.__version__} takes no named parameters"
)
def test_rows_takes_names_of_named_parameters_and_leaves_unmatched_optimizers_as_they_are() -> None:
    net = Net()
    with safeopt.patch(rows="^embed"):
        plain = torch.optim.SGD(net.body.parameters(), lr=0.1)
        named = torch.optim.SGD(list(net.named_parameters()), lr=0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lazy"] is True
    assert [g["param_names"] for g in named.param_groups] == [
        ["body.weight", "body.bias", "branch.weight", "branch.bias"],
        ["embed.weight"],
    ]


def test_wrap_all_gives_another_optimizer_the_rule_in_place() -> None:
    a, b = twins()
    with safeopt.patch(wrap_all=True) as p:
        opt = torch.optim.NAdam(a.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
        train(a, opt, steps=1)
        sched.step()
    assert type(opt) is torch.optim.NAdam and torch.optim.Optimizer.__init__ is INIT
    hand = safeopt.wrap(torch.optim.NAdam(b.parameters(), lr=0.1))
    hand_sched = torch.optim.lr_scheduler.StepLR(hand, step_size=2)
    train(b, hand, steps=1)
    hand_sched.step()
    train(a, opt, steps=5)  # wrapped for good: the rule stays after the patch ends
    train(b, hand, steps=5)
    assert all(bit_equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert "safeopt.NAdam" not in p.summary() and "torch.optim.NAdam x1" in p.summary()
    assert p.as_dict()["lazy"] == {"torch.optim.NAdam": 1}


def test_other_optimizers_are_listed_and_lbfgs_is_not_wrapped() -> None:
    net = Net()
    with safeopt.patch() as p:
        train(net, torch.optim.NAdam(net.parameters(), lr=0.1), steps=1)
    assert "not replaced: torch.optim.NAdam x1" in p.summary() and "safeopt.wrap(optimizer)" in p.summary()
    with safeopt.patch(wrap_all=True) as p:
        torch.optim.LBFGS(net.parameters())
    assert "--wrap-all could not wrap torch.optim.LBFGS: LBFGS re-evaluates its closure" in p.summary()
