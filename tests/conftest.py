"""Hypothesis profiles: ``dev`` (quick, the default) and ``ci`` (thorough, used by .ci/run)."""

import os

import torch
from hypothesis import HealthCheck, settings

# The tests step small tensors: one thread is fastest, and avoids the oversubscription
# slowdowns (100x seen here) when other processes share the cores.
torch.set_num_threads(1)

settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
