"""safeopt: torch.optim optimizers that never move a parameter that took no part in a step."""

from safeopt._freeze import Target
from safeopt.optimizers import SGD, Adam, AdamW
from safeopt.wrap import LazyWrapper, wrap

__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "AdamW", "LazyWrapper", "Target", "__version__", "wrap"]
