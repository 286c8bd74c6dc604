"""Hypothesis profiles.

``ci``: deterministic and bounded; chosen when CI is set (``.ci/run``).
``local``: more examples, random seeds; the default elsewhere.
``HYPOTHESIS_PROFILE=<name>`` picks one explicitly.
"""

import os

# torch's test utilities (imported by tests/cases.py for optim_db) register and load a
# hypothesis profile of their own at import. Import them first so that ours wins.
import torch.testing._internal.common_utils  # noqa: F401
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    stateful_step_count=15,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "local",
    max_examples=1000,
    stateful_step_count=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "local"))
