"""The optimizer-case database that drives parity, error and state_dict tests.

Configurations come from torch's own ``optim_db`` (every ``OptimizerInput`` of
every optimizer), crossed with the implementations torch supports for it, plus
the options ``optim_db`` leaves out (tensor betas, nesterov with dampening 0,
decoupled weight decay, amsgrad with maximize).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import safeopt

TWINS: dict[type, type] = {
    torch.optim.Adam: safeopt.Adam,
    torch.optim.AdamW: safeopt.AdamW,
    torch.optim.SGD: safeopt.SGD,
}

# Optimizers wrap() refuses (LBFGS) or that need inputs a generic model cannot give
# (SparseAdam needs sparse grads; Muon needs 2-d parameters only).
NOT_GENERIC = {"LBFGS", "SparseAdam", "Muon"}


@dataclasses.dataclass(frozen=True)
class Case:
    torch_cls: type
    kwargs: dict[str, Any]
    impl: str  # "forloop", "foreach", "fused" or "differentiable"
    desc: str

    @property
    def id(self) -> str:
        return f"{self.torch_cls.__name__}-{self.impl}-{self.desc.replace(' ', '_')}"

    @property
    def twin(self) -> type | None:
        return TWINS.get(self.torch_cls)

    def make_torch(self, params: Any) -> torch.optim.Optimizer:
        return self.torch_cls(params, **self.kwargs)

    def make_safe(self, params: Any, **extra: Any) -> torch.optim.Optimizer:
        if self.twin is not None:
            return self.twin(params, **self.kwargs, **extra)
        return safeopt.wrap(self.torch_cls(params, **self.kwargs), **extra)


_IMPL_FLAGS = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "differentiable": {"differentiable": True, "foreach": False},
}

_EXTRA: dict[type, list[tuple[dict[str, Any], str]]] = {
    torch.optim.Adam: [
        ({"amsgrad": True, "maximize": True, "weight_decay": 0.1}, "amsgrad maximize"),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled_weight_decay"),
        ({"betas": (torch.tensor(0.8), torch.tensor(0.9))}, "tensor betas"),
        ({"lr": torch.tensor(0.01)}, "tensor lr"),
    ],
    torch.optim.AdamW: [({"amsgrad": True, "maximize": True}, "amsgrad maximize")],
    torch.optim.SGD: [({"momentum": 0.9, "nesterov": True}, "nesterov no decay")],
}


def _valid(torch_cls: type, kwargs: dict[str, Any]) -> bool:
    try:
        torch_cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    except (ValueError, RuntimeError):
        return False
    return True


def cases(device: str = "cpu", *, twins_only: bool = False) -> list[Case]:
    out = []
    for info in optim_db:
        cls = info.optim_cls
        if cls.__name__ in NOT_GENERIC or (twins_only and cls not in TWINS):
            continue
        inputs = [(i.kwargs, i.desc) for i in info.optim_inputs_func(device=device, dtype=torch.float32)]
        inputs += _EXTRA.get(cls, [])
        impls = ["forloop"] + [impl for impl in ("foreach", "fused", "differentiable") if impl in info.supported_impls]
        if "fused" in impls and device not in info.supports_fused_on:
            impls.remove("fused")
        for kwargs, desc in inputs:
            for impl in impls:
                full = {**kwargs, **_IMPL_FLAGS[impl]}
                if _valid(cls, full):
                    out.append(Case(cls, full, impl, desc))
    return out


def error_cases(device: str = "cpu") -> list[Any]:
    """torch's construction-error inputs for the optimizers safeopt twins."""
    out = []
    for info in optim_db:
        if info.optim_cls not in TWINS:
            continue
        for err in info.optim_error_inputs_func(device=device, dtype=torch.float32):
            if err.error_on is OptimizerErrorEnum.CONSTRUCTION_ERROR:
                out.append((info.optim_cls, err))
    return out
