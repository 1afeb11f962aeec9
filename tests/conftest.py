"""Shared test set-up: hypothesis profiles (deterministic in CI), torch's global state, the
number of pytest-xdist workers."""

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Each pytest-xdist worker gets one core's worth of symgrad's pool (there is a worker per core):
# kernels run serially unless a test sets the threads (tests/test_threads.py does).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("SYMGRAD_NUM_THREADS", "1")

settings.register_profile(
    "ci", derandomize=True, max_examples=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: Memory one test worker may need at its peak (the MiniLM tests load the pretrained encoder
#: and its twin; the largest measured 3.5 GB), for ``-n auto``.
WORKER_BYTES = 4 << 30


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, see pyproject.toml): one worker per core this process may run
    on, no more than the machine's memory holds.  The workers share compiled kernels through
    the disk cache (written atomically: two workers compiling one kernel both succeed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        memory = WORKER_BYTES
    return max(1, min(cores or 1, memory // WORKER_BYTES))


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
