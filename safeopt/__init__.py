"""safeopt: torch.optim optimizers that never move a parameter that took no part in a step."""

from safeopt._audit import AuditReport, Finding, audit
from safeopt._bench import bench
from safeopt._freeze import Target
from safeopt._groups import groups
from safeopt._optimizers import SGD, Adam, AdamW
from safeopt._patch import Patch, patch, unpatch
from safeopt._watch import ParamDrift, SliceDrift, Watch, WatchReport, watch
from safeopt._wrap import LazyWrapper, wrap

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "AuditReport",
    "Finding",
    "LazyWrapper",
    "ParamDrift",
    "Patch",
    "SliceDrift",
    "Target",
    "Watch",
    "WatchReport",
    "__version__",
    "audit",
    "bench",
    "groups",
    "patch",
    "unpatch",
    "watch",
    "wrap",
]
