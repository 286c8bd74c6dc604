"""The global watch of ``python -m safeopt watch`` (safeopt/_observe.py), in this process: every
optimizer that steps, named by the modules that hold its parameters, numbers unchanged."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import safeopt
from harness import bit_equal
from safeopt._observe import GlobalWatch, module_names


def gan() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))


def alternate(gen: nn.Module, disc: nn.Module, opts: list[torch.optim.Optimizer], steps: int = 4) -> None:
    torch.manual_seed(1)
    for step in range(steps):
        for opt in opts:
            opt.zero_grad(set_to_none=False)
        x = gen(torch.randn(4, 3))
        (disc(x if step % 2 else x.detach())).mean().backward()  # gen idle every other step
        for opt in opts:
            opt.step()


def test_every_optimizer_is_watched_and_nothing_changes() -> None:
    gen, disc = gan()
    gen2, disc2 = gan()
    one = torch.optim.Adam([*gen.parameters(), *disc.parameters()], lr=0.1, weight_decay=0.1)
    other = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    watch = GlobalWatch()
    watch.start()
    try:
        alternate(gen, disc, [one, other])
    finally:
        watch.stop()
    alternate(
        gen2,
        disc2,
        [
            torch.optim.Adam([*gen2.parameters(), *disc2.parameters()], lr=0.1, weight_decay=0.1),
            torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9),
        ],
    )
    assert all(
        bit_equal(a, b)
        for a, b in zip([*gen.parameters(), *disc.parameters()], [*gen2.parameters(), *disc2.parameters()])
    )
    first, second = watch.as_dict()["optimizers"]
    assert (first["class"], first["steps"]) == ("torch.optim.adam.Adam", 4)
    # two outermost modules of one class: numbered; gen's parameters idle in two of the four steps
    names = [p["name"] for p in first["params"]]
    assert names == [
        f"{root}.{i}.{k}"
        for root in ("Sequential", "Sequential#2")
        for i in (0, 1)
        for k in ("weight", "bias")
    ]
    assert [p["idle_steps"] for p in first["params"]] == [2] * 4 + [0] * 4
    # step 0: grads None (none made yet), torch skips them; step 2: all zero, Adam moves them
    assert [p["moved_steps"] for p in first["params"]] == [1] * 4 + [0] * 4
    # a parameter no module holds: its position; its grad is None every step: idle, never moved
    assert second["params"][0]["name"] == "param_groups[0][0]"
    assert (second["params"][0]["idle_steps"], second["params"][0]["moved_steps"]) == (4, 0)
    text = watch.text(lambda wrap_all: f"fix --wrap-all={wrap_all}")
    assert "verdict: affected: torch.optim.adam.Adam moved 4 parameter(s)" in text
    assert text.endswith("fix: fix --wrap-all=False")


def test_an_optimizer_run_does_not_replace_asks_for_wrap_all_and_a_safeopt_one_is_not_affected() -> None:
    gen, disc = gan()
    watch = GlobalWatch()
    watch.start()
    try:
        alternate(gen, disc, [torch.optim.NAdam(gen.parameters(), lr=0.1)], steps=3)
    finally:
        watch.stop()
    assert watch.text(lambda wrap_all: f"--wrap-all={wrap_all}").endswith("fix: --wrap-all=True")
    watch = GlobalWatch()
    watch.start()
    try:
        alternate(gen, disc, [safeopt.AdamW(gen.parameters(), lr=0.1)], steps=3)
    finally:
        watch.stop()
    text = watch.text(str)
    assert "safeopt.AdamW" in text and "verdict: not affected" in text and "fix:" not in text


def test_a_closure_makes_the_grads_inside_the_step() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = net[1](net[0](torch.ones(1, 2)).detach()).sum()
        loss.backward()
        return loss

    watch = GlobalWatch()
    watch.start()
    try:
        for _ in range(3):
            opt.step(closure)
    finally:
        watch.stop()
    (report,) = watch.as_dict()["optimizers"]
    idle = {p["name"]: p["idle_steps"] for p in report["params"]}
    assert idle == {"0.weight": 3, "0.bias": 3, "1.weight": 0, "1.bias": 0}


def test_module_names_are_the_outermost_modules() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(2, 2))

    model = Model()
    loose = nn.Parameter(torch.ones(1))
    names = module_names([model.encoder[0].weight, loose])
    assert names == {id(model.encoder[0].weight): "encoder.0.weight"}


def test_names_are_taken_at_the_first_step_while_the_model_lives() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = GlobalWatch()
    watch.start()
    try:
        model(torch.ones(1, 2)).sum().backward()
        opt.step()  # every parameter has a grad: the watch records nothing
    finally:
        watch.stop()
    del model  # the optimizer still holds the parameters; no module does any more
    (report,) = watch.as_dict()["optimizers"]
    assert [p["name"] for p in report["params"]] == ["0.weight", "0.bias"]


def test_an_optimizer_the_script_drops_is_freed_and_still_reported() -> None:
    watch = GlobalWatch()
    watch.start()
    try:
        model = nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model.weight.grad = torch.zeros(2, 2)
        opt.step()
        gone = weakref.ref(opt)
        del opt
        gc.collect()
        assert gone() is None  # the watch keeps no optimizer alive
        second = torch.optim.SGD(model.parameters(), lr=0.1)
        second.step()
    finally:
        watch.stop()
    first, then = watch.as_dict()["optimizers"]
    assert first["class"] == "torch.optim.adamw.AdamW" and then["class"] == "torch.optim.sgd.SGD"
    assert [(p["name"], p["idle_steps"], p["moved_steps"]) for p in first["params"]] == [
        ("weight", 1, 1),
        ("bias", 1, 0),
    ]
