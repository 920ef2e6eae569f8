"""Hypothesis profiles (``dev``, quick, the default; ``ci``, thorough, used by .ci/run) and the
``device`` fixture: every device this machine has (CPU always, CUDA or MPS where present)."""

import os

import pytest
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

DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")
if torch.backends.mps.is_available():
    DEVICES.append("mps")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)
