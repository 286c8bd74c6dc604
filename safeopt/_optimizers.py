"""safeopt.Adam, safeopt.AdamW and safeopt.SGD: the lazy rule plus the torch class.

Each is the torch class with :class:`~safeopt._lazy.LazyOptimizer` in front of it,
so ``isinstance(opt, torch.optim.Adam)`` holds and torch validates every argument.
"""

from __future__ import annotations

import torch

from safeopt._doc import lazy_twin_doc, lazy_twin_signature
from safeopt._lazy import LazyOptimizer

__all__ = ["SGD", "Adam", "AdamW"]


class Adam(LazyOptimizer, torch.optim.Adam):
    __doc__ = lazy_twin_doc(torch.optim.Adam)


class AdamW(LazyOptimizer, torch.optim.AdamW):
    __doc__ = lazy_twin_doc(torch.optim.AdamW)


class SGD(LazyOptimizer, torch.optim.SGD):
    __doc__ = lazy_twin_doc(torch.optim.SGD)


for _cls, _torch_cls in ((Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW), (SGD, torch.optim.SGD)):
    # The loop variable is a union of the three classes; inspect.signature reads __signature__.
    _cls.__signature__ = lazy_twin_signature(_torch_cls)  # type: ignore[union-attr]  # read by inspect.signature
    _cls.__module__ = "safeopt"
del _cls, _torch_cls
