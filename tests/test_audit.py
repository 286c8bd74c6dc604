"""safeopt.audit: each kind of finding, on real models, named by parameter."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import safeopt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def kinds(report: safeopt.AuditReport) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    for f in report.findings:
        out.setdefault(f.kind, []).append(f.names)
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        lambda m: torch.optim.SGD(
            [{"params": m.encoder.parameters()}, {"params": m.head.parameters(), "lr": 0.1}], lr=0.01
        ),
        lambda m: safeopt.AdamW(m.named_parameters(), lr=1e-3),
        lambda m: safeopt.wrap(torch.optim.RMSprop(m.parameters())),
    ],
    ids=["Adam", "SGD two groups", "safeopt named", "wrap"],
)
def test_a_clean_model_gives_a_falsy_report(make) -> None:
    model = Net()
    report = safeopt.audit(model, make(model))
    assert not report and len(report) == 0 and report.findings == []
    assert str(report) == "audit: 4 trainable parameter(s) in the model, 4 held by the optimizer: no findings"


def test_a_module_added_after_the_optimizer_was_built() -> None:
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.adapter = nn.Linear(16, 16)  # e.g. a LoRA adapter attached later
    report = safeopt.audit(model, opt)
    assert kinds(report) == {"not_in_optimizer": [("adapter.weight",), ("adapter.bias",)]}
    text = str(report)
    assert "adapter.weight" in text and "adapter.bias" in text and "never train" in text
    # An added module that is frozen (requires_grad=False) is not a finding.
    model.adapter.requires_grad_(False)
    assert not safeopt.audit(model, opt)


@pytest.mark.parametrize("named", [False, True], ids=["positional", "named_parameters"])
def test_a_parameter_replaced_after_the_optimizer_was_built(named: bool) -> None:
    model = Net()
    opt = torch.optim.Adam(model.named_parameters() if named else model.parameters(), lr=1e-3)
    old = model.head.weight
    model.head.weight = nn.Parameter(torch.zeros_like(old))  # re-initialised the wrong way
    report = safeopt.audit(model, opt)
    assert kinds(report) == {"replaced": [("head.weight",)]}
    (finding,) = report.findings
    assert "group 0, position 2" in finding.detail and "4x16" in finding.detail
    assert "head.weight" in str(report) and "replaced after the optimizer was built" in str(report)
    # The optimizer does step the old tensor, not the model's: the finding is real.
    old.grad = torch.ones_like(old)
    model.head.weight.grad = torch.ones_like(old)
    before = model.head.weight.detach().clone()
    opt.step()
    assert torch.equal(model.head.weight, before)


def test_a_removed_module_leaves_optimizer_parameters_outside_the_model() -> None:
    model = Net()
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    model.head = nn.Identity()
    report = safeopt.audit(model, opt)
    assert kinds(report) == {"not_in_model": [("head.weight",), ("head.bias",)]}
    assert "no longer in the model" in str(report) and "head.bias" in str(report)

    positional = torch.optim.Adam([{"params": [nn.Parameter(torch.ones(3))], "name": "extra"}], lr=1e-3)
    report = safeopt.audit(Net(), positional)
    assert kinds(report)["not_in_model"] == [("param_groups[0][0]",)]
    assert "group 'extra', position 0" in str(report)


def test_parameters_held_with_requires_grad_false() -> None:
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.encoder.requires_grad_(False)
    report = safeopt.audit(model, opt)
    assert kinds(report) == {"requires_grad_false": [("encoder.weight",), ("encoder.bias",)]}
    assert "encoder.weight" in str(report)


def test_requires_grad_false_with_a_leftover_zero_grad_is_still_stepped_by_torch() -> None:
    # What the requires_grad_false finding warns about, checked against torch.
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    model.encoder.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    model(torch.randn(2, 8)).sum().backward()
    before = model.encoder.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.encoder.weight, before)


def test_a_parameter_held_twice() -> None:
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about duplicates in a group
        opt = torch.optim.SGD([*model.parameters(), model.head.bias], lr=0.1)
    report = safeopt.audit(model, opt)
    assert kinds(report) == {"held_twice": [("head.bias",)]}
    assert "held 2 times: group 0 position 3, group 0 position 4" in str(report)


def test_one_parameter_under_several_names() -> None:
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "unembed": nn.Linear(4, 10, bias=False)})
    model["unembed"].weight = model["embed"].weight  # tied weights
    report = safeopt.audit(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    assert kinds(report) == {"shared": [("embed.weight", "unembed.weight")]}
    assert "embed.weight = unembed.weight" in str(report)


def test_several_findings_are_all_listed() -> None:
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.extra = nn.Linear(2, 3)
    model.encoder.bias.requires_grad_(False)
    model.head = nn.Linear(16, 5)  # not the same shape: removed and added, not replaced
    report = safeopt.audit(model, opt)
    found = kinds(report)
    assert found["not_in_optimizer"] == [("head.weight",), ("head.bias",), ("extra.weight",), ("extra.bias",)]
    assert len(found["not_in_model"]) == 2
    assert found["requires_grad_false"] == [("encoder.bias",)]
    assert str(report).startswith(
        "audit: 5 trainable parameter(s) in the model, 4 held by the optimizer: 7 finding(s)"
    )
    assert repr(report).startswith("<AuditReport: 7 finding(s)")


def test_audit_changes_nothing_and_checks_its_arguments() -> None:
    model = Net()
    opt = safeopt.Adam(model.parameters(), lr=1e-3)
    groups = [dict(g) for g in opt.param_groups]
    safeopt.audit(model, opt)
    assert [dict(g) for g in opt.param_groups] == groups
    with pytest.raises(TypeError, match="nn.Module"):
        safeopt.audit(opt, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Optimizer"):
        safeopt.audit(model, list(model.parameters()))  # type: ignore[arg-type]
