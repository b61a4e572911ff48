"""Test-suite settings: headless plots, deterministic hypothesis in CI, one thread.

Test problems are small: intra-op threads buy nothing there, and on a busy
2-core machine (CI) oversubscribed OpenMP threads slow small ops down by 10-50x.
Set before torch is imported so spawned worker processes inherit it.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread and leaves it so (the bench CLI sets threads)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
