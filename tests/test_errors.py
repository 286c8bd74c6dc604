"""Bad input gets torch's own error: every construction-error input of torch's optim_db."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import cases
import safeopt

ERRORS = cases.error_cases()


def _outcome(cls: type, err) -> tuple[type, str]:
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.zeros(2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            cls(params, **inp.kwargs)
        except (Exception, Warning) as e:  # noqa: BLE001
            return type(e), str(e)
    return type(None), ""


def _id(case: tuple[type, object]) -> str:
    cls, err = case
    return cls.__name__ + "-" + re.sub(r"\W+", "_", err.error_regex)[:40]  # type: ignore[attr-defined]


@pytest.mark.parametrize("torch_cls, err", ERRORS, ids=[_id(c) for c in ERRORS])
def test_construction_errors_are_torchs(torch_cls: type, err) -> None:
    expected = _outcome(torch_cls, err)
    got = _outcome(cases.TWINS[torch_cls], err)
    assert issubclass(expected[0], err.error_type) and re.search(err.error_regex, expected[1])
    assert got == expected


def test_step_errors_are_torchs_and_keep_grads() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (3,), check_invariants=True)
    p.grad = grad
    for cls in (torch.optim.Adam, safeopt.Adam):
        with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
            cls([p]).step()
        assert p.grad is grad and torch.equal(p, torch.ones(3))


def test_a_failing_step_restores_the_param_groups_and_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = safeopt.SGD([a, b], lr=0.1)
    ga, gb = torch.zeros(2), torch.ones(2)
    a.grad, b.grad = ga, gb

    def boom(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.optim.SGD, "step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert opt.param_groups[0]["params"] == [a, b]
    assert a.grad is ga and b.grad is gb and torch.equal(gb, torch.ones(2))
