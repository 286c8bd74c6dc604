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
    text = watch.text(lambda wrap_all, rows: f"fix --wrap-all={wrap_all} --rows={rows}")
    assert "verdict: affected: torch.optim.adam.Adam moved 4 parameter(s)" in text
    assert text.endswith("fix: fix --wrap-all=False --rows=None")


def test_an_optimizer_run_does_not_replace_asks_for_wrap_all_and_a_safeopt_one_is_not_affected() -> None:
    gen, disc = gan()
    watch = GlobalWatch()
    watch.start()
    try:
        alternate(gen, disc, [torch.optim.NAdam(gen.parameters(), lr=0.1)], steps=3)
    finally:
        watch.stop()
    assert watch.text(lambda wrap_all, rows: f"--wrap-all={wrap_all}").endswith("fix: --wrap-all=True")
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


class Experts(nn.Module):
    """Fused experts as transformers 5 keeps them: one ``[E, ...]`` parameter a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ParameterDict({"gate_up_proj": nn.Parameter(torch.ones(4, 3, 2))}) for _ in range(2)
        )


def test_idle_experts_of_an_active_parameter_give_the_verdict_and_a_rows_fix() -> None:
    """A fused expert parameter always has a gradient; its idle expert slices are what moves."""
    model = Experts()
    params = [layer["gate_up_proj"] for layer in model.layers]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    watch = GlobalWatch()
    watch.start()
    try:
        for step in range(3):
            for p in params:
                grad = torch.zeros_like(p)
                grad[step % 2] = 1.0  # experts 0 and 1 take turns; 2 and 3 never get a token
                p.grad = grad
            opt.step()
    finally:
        watch.stop()
    (data,) = watch.as_dict()["optimizers"]
    assert [p["name"] for p in data["params"]] == ["layers.0.gate_up_proj", "layers.1.gate_up_proj"]
    for p in data["params"]:
        assert (p["idle_steps"], p["moved_steps"]) == (0, 0)
        assert p["rows"]["idle_slice_steps"] == 3 * 3  # three idle experts in each of the 3 steps
        assert p["rows"]["moved_slice_steps"] == 3 * 3  # AdamW's weight decay moves every one
    text = watch.text(lambda wrap_all, rows: f"run --rows {rows}")
    assert "moved 8 slice(s) along dim 0 (experts, embedding rows) of 2 parameter(s)" in text
    assert text.endswith(r"fix: run --rows layers\.\d+\.gate_up_proj")


def test_an_optimizer_alive_at_exit_ends_the_process_cleanly(tmp_path) -> None:
    """The report is made before exit; an optimizer collected at the interpreter's exit makes no
    summary inside the garbage collector (torch's tensors may be torn down then: it aborted)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "keep.py"
    script.write_text(
        "import torch\n"
        "from safeopt._observe import GlobalWatch\n"
        "watch = GlobalWatch(); watch.start()\n"
        "p = torch.nn.Parameter(torch.ones(4, 3))\n"
        "opt = torch.optim.AdamW([p], lr=0.1)\n"
        "for i in range(2):\n"
        "    g = torch.zeros(4, 3); g[i] = 1.0; p.grad = g; opt.step()\n"
        "watch.stop(); print(len(watch.summaries()))\n"
        "class Holder: pass\n"
        "h = Holder(); h.self = h; h.opt = opt; h.error = ValueError(); h.error.h = h\n"
        "del opt, p\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root)},
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")
