"""The optimizer-case database: which optimizer x option combinations the tests run, and why not the others.

Configurations come from the installed torch's own ``optim_db`` (every ``OptimizerInput`` of
every optimizer; it changes between torch releases), crossed with the implementations torch
supports for it, plus the options ``optim_db`` leaves out (``EXTRA``). Every exception to
"every optimizer, every option, every implementation" lives in this file, with its reason:

- ``NOT_GENERIC``: optimizers no generic test can drive;
- ``torch_lacks``: an option the installed torch does not have (``decoupled_weight_decay``
  before torch 2.7, say): such a case is not dropped but handed to pytest as a skip that names
  the torch version (``params``);
- ``refused_by_torch``: a combination torch itself refuses at construction (``fused`` with
  ``differentiable``, say): not a configuration at all;
- ``ROW_CONFIGS`` and ``rows_unsupported``: the configurations of the row-lazy property test
  and the implementation x dtype pairs it cannot use;
- ``FSDP2_ON_CPU``: whether the installed torch runs FSDP2 on the CPU (distributed tests).

What a test still rules out at run time (``assume(torch can step this drawn model)`` in
``test_properties``) depends on the drawn model, not on the configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import safeopt

TORCH = torch.__version__

TWINS: dict[type, type] = {
    torch.optim.Adam: safeopt.Adam,
    torch.optim.AdamW: safeopt.AdamW,
    torch.optim.SGD: safeopt.SGD,
}

# Optimizers wrap() refuses or that need inputs a generic model cannot give.
NOT_GENERIC: dict[str, str] = {
    "LBFGS": "wrap() refuses it: it re-evaluates its closure inside step()",
    "SparseAdam": "it needs sparse grads",
    "Muon": "it takes 2-d parameters only",
}

# Options optim_db leaves out, by class: (kwargs, description).
EXTRA: dict[type, list[tuple[dict[str, Any], str]]] = {
    torch.optim.Adam: [
        ({"amsgrad": True, "maximize": True, "weight_decay": 0.1}, "amsgrad maximize"),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled_weight_decay"),
        ({"betas": (torch.tensor(0.8), torch.tensor(0.9))}, "tensor betas"),
        ({"lr": torch.tensor(0.01)}, "tensor lr"),
    ],
    torch.optim.AdamW: [({"amsgrad": True, "maximize": True}, "amsgrad maximize")],
    torch.optim.SGD: [({"momentum": 0.9, "nesterov": True}, "nesterov no decay")],
}

IMPL_FLAGS: dict[str, dict[str, Any]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "differentiable": {"differentiable": True, "foreach": False},
}

# The row-lazy property test (tests/test_rows.py): configurations of the twins, implementations
# and dtypes it draws from.
ROW_CONFIGS: list[tuple[type, dict[str, Any]]] = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.1}),
    (torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    (torch.optim.AdamW, {"amsgrad": True, "maximize": True}),
    (torch.optim.SGD, {}),
    (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "maximize": True}),
    (torch.optim.SGD, {"momentum": 0.5, "nesterov": True}),  # torch's foreach step writes into grads
]
ROW_IMPLS: dict[str, dict[str, Any]] = {k: IMPL_FLAGS[k] for k in ("forloop", "foreach", "fused")}


def torch_lacks(torch_cls: type, kwargs: dict[str, Any]) -> str | None:
    """Why the installed torch cannot take ``kwargs`` (options its class does not have), or None."""
    known = inspect.signature(torch_cls.__init__).parameters
    missing = sorted(k for k in kwargs if k not in known)
    if not missing:
        return None
    return f"torch {TORCH}: {torch_cls.__name__} has no option {', '.join(missing)}"


def refused_by_torch(torch_cls: type, kwargs: dict[str, Any]) -> bool:
    """Whether torch refuses the combination at construction (not a configuration at all)."""
    try:
        torch_cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    except (ValueError, RuntimeError):
        return True
    return False


@functools.cache
def cpu_fused_sgd_skips_lowp_blocks() -> bool:
    """Whether the installed torch's CPU fused SGD has pytorch/pytorch#191763 (fixed in 2.14): on
    bfloat16 and float16 it leaves the vectorised blocks of a parameter as they were and, with
    momentum, fills its buffer from memory it never wrote (different bits from run to run)."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=0.5, fused=True).step()
    return bool(p.detach()[0] == 1)  # the forloop step makes it 0.5


def rows_unsupported(torch_cls: type, impl: str, dtype: torch.dtype) -> str | None:
    """Why the row-lazy property tests cannot use ``impl`` with ``dtype`` (they fall back to forloop)."""
    if impl == "fused" and dtype.is_complex:
        return "torch's fused kernels take floating dtypes only"
    if (
        torch_cls is torch.optim.SGD
        and impl == "fused"
        and dtype in (torch.bfloat16, torch.float16)
        and cpu_fused_sgd_skips_lowp_blocks()
    ):
        # A row's update depends on where it sits in the tensor, and the momentum buffer on
        # uninitialised memory: no oracle can match it.
        return f"torch {TORCH}'s CPU fused SGD skips the vectorised blocks of a bfloat16 or float16 tensor"
    return None


def row_configs() -> list[tuple[type, dict[str, Any]]]:
    """``ROW_CONFIGS`` that the installed torch has (what it lacks, parity tests report as skips)."""
    return [(cls, kwargs) for cls, kwargs in ROW_CONFIGS if torch_lacks(cls, kwargs) is None]


# Why FSDP2 (fully_shard) cannot run on the CPU with the installed torch, or None: torch 2.6's
# torch.cpu.Stream has no record_event, which FSDP2's all-gather calls.
FSDP2_ON_CPU: str | None = (
    None
    if hasattr(torch.cpu.Stream, "record_event")
    else f"torch {TORCH}: FSDP2 does not run on the CPU (torch.cpu.Stream has no record_event)"
)


@dataclasses.dataclass(frozen=True)
class Case:
    torch_cls: type
    kwargs: dict[str, Any]
    impl: str  # "forloop", "foreach", "fused" or "differentiable"
    desc: str
    skip: str | None = None  # why the installed torch cannot run it

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


def _all_cases(device: str, twins_only: bool) -> list[Case]:
    out = []
    for info in optim_db:
        cls = info.optim_cls
        if cls.__name__ in NOT_GENERIC or (twins_only and cls not in TWINS):
            continue
        inputs = [(i.kwargs, i.desc) for i in info.optim_inputs_func(device=device, dtype=torch.float32)]
        inputs += EXTRA.get(cls, [])
        impls = ["forloop"] + [
            impl for impl in ("foreach", "fused", "differentiable") if impl in info.supported_impls
        ]
        if "fused" in impls and device not in info.supports_fused_on:
            impls.remove("fused")
        for kwargs, desc in inputs:
            for impl in impls:
                full = {**kwargs, **IMPL_FLAGS[impl]}
                lacks = torch_lacks(cls, full)
                if lacks is not None:
                    out.append(Case(cls, full, impl, desc, skip=lacks))
                elif not refused_by_torch(cls, full):
                    out.append(Case(cls, full, impl, desc))
    return out


def cases(device: str = "cpu", *, twins_only: bool = False) -> list[Case]:
    """Every configuration the installed torch can run."""
    return [c for c in _all_cases(device, twins_only) if c.skip is None]


def params(
    device: str = "cpu", *, twins_only: bool = False, where: Callable[[Case], bool] = lambda c: True
) -> list[Any]:
    """The cases (those ``where`` selects) as pytest parameters; what the installed torch lacks is a skip."""
    out = []
    for c in _all_cases(device, twins_only):
        if where(c):
            marks = [pytest.mark.skip(reason=c.skip)] if c.skip else []
            out.append(pytest.param(c, id=c.id, marks=marks))
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


#: Names the property machines give param groups, and every kind of target the freeze API takes.
GROUP_NAMES = (None, "body", "head")
TARGET_KINDS = (
    "param",
    "list",
    "tuple",
    "generator",
    "module",
    "group_index",
    "group_negative_index",
    "group_name",
    "group_dict",
)


def trainer_args(tf: Any, output_dir: str, **settings: Any) -> Any:
    """Hugging Face ``TrainingArguments`` for a deterministic CPU run that saves a checkpoint every
    3 steps and logs, reports and shows nothing; ``settings`` add or override (``max_steps``...)."""
    return tf.TrainingArguments(
        output_dir=output_dir,
        **{
            "save_strategy": "steps",
            "save_steps": 3,
            "logging_strategy": "no",
            "report_to": [],
            "use_cpu": True,
            "seed": 0,
            "data_seed": 0,
            "dataloader_num_workers": 0,
            "disable_tqdm": True,
            **settings,
        },
    )
