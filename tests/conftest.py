"""Test-wide settings: offline, and one torch thread per test process (pytest-xdist runs one process per core;
oversubscribed OpenMP threads make tiny models orders of magnitude slower)."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# computed statistics (the toy reference set) are cached per test process, never in the user's ~/.cache
os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="stepdistill-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    """The tiny SD-like teacher of tests/tiny_models.py (ε-prediction, seed 0), built once per test module."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import make_tiny_sd_pipeline

    from stepdistill.models.teacher import Teacher

    return Teacher(make_tiny_sd_pipeline(seed=0))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after a test that builds Trainers (each builds an
    Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
