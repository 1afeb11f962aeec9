"""Shared test set-up: hypothesis profiles (deterministic in CI), torch's global state."""

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def torch_state() -> Iterator[None]:
    """torch's global RNG seeded and default dtype float32, restored afterwards (some test
    modules set the default dtype to float64 at import).  Modules that need it use
    ``pytestmark = pytest.mark.usefixtures("torch_state")``."""
    import torch

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_default_dtype(dtype)
