"""The one text that says what a safeopt optimizer does differently from torch."""

from __future__ import annotations

import inspect
from typing import Literal

RULE = """\
A parameter is *inactive* in a step when its group or the parameter itself is
frozen (see :meth:`freeze`), its grad is ``None``, or, with ``lazy=True`` (the
default), every element of its grad equals zero (``-0.0`` counts as zero; NaN,
inf and subnormal values do not, subnormals unless ``torch.set_flush_denormal(True)``
makes torch compare them equal to zero). An inactive parameter, its grad and all of its
optimizer state stay bit-identical: no moment decay, no weight decay, no step
count. Active parameters are updated by torch's own kernels exactly as torch
would update them: a step equals a torch step on an optimizer holding only the
active parameters. An inactive parameter with a grad gets its state allocated as
torch allocates it (zeros, step 0), without an update.

``lazy`` (keyword-only, also a per-group option): ``False`` restores torch's
treatment of zero grads; freezing still applies. ``"rows"`` (``Adam``, ``AdamW``
and ``SGD``) applies the rule to each row (slice along dim 0) of a parameter of
two or more dimensions, with per-row step counts: see ``docs/rows.md``."""


def lazy_twin_doc(torch_cls: type) -> str:
    name = torch_cls.__name__
    return (
        f"Drop-in :class:`torch.optim.{name}` that never moves a parameter that took no part in a step.\n\n"
        f"Accepts every argument of ``torch.optim.{name}`` (validated by torch) plus ``lazy``.\n\n" + RULE
    )


def lazy_twin_signature(torch_cls: type) -> inspect.Signature:
    """torch's constructor signature with the keyword-only ``lazy=True`` added."""
    sig = inspect.signature(torch_cls)
    lazy = inspect.Parameter(
        "lazy", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool | Literal["rows"]
    )
    return sig.replace(parameters=[*sig.parameters.values(), lazy])
