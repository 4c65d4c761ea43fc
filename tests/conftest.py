"""Test-wide settings and the fixtures several test files share.

Settings: offline, and one torch thread per test process (pytest-xdist runs one process per core; oversubscribed
OpenMP threads make tiny models orders of magnitude slower); tests/ on the import path, for the helper modules
(tiny_models.py: model builders; plain_diffusers.py: the subprocess that never imports stepdistill; helpers.py: the
CLI, short-run overrides, accelerate state; reference_maths.py: the objective tests' hand-written reference maths).
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# computed statistics (the toy reference set) are cached per test process, never in the user's ~/.cache
os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="stepdistill-test-cache-"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from helpers import reset_accelerate_state  # noqa: E402


# --- tiny models -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher():
    """The tiny SD-like teacher of tests/tiny_models.py (ε-prediction, seed 0), built once per test module."""
    from tiny_models import make_tiny_sd_pipeline

    from stepdistill.models.teacher import Teacher

    return Teacher(make_tiny_sd_pipeline(seed=0))


@pytest.fixture(scope="module")
def generator(teacher):
    """A one-step student initialised from the teacher (a full UNet copy), built once per test module."""
    from stepdistill.models.generators import Generator

    return Generator.from_teacher(teacher)


@pytest.fixture(scope="module")
def embeds():
    """``B`` (reference_maths.py: 3) random conditional and unconditional prompt embeddings (seed 1)."""
    from reference_maths import random_prompt_embeds

    return random_prompt_embeds()


@pytest.fixture()
def batch(embeds):
    """An objective's batch: ``embeds`` (the module's own when it overrides the fixture), generator noise and real
    latents (seed 2)."""
    from reference_maths import B

    from stepdistill.objectives import Batch, RealImages

    g = torch.Generator().manual_seed(2)
    return Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=g),
                 real=RealImages(torch.randn(B, 4, 8, 8, generator=g)))


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A pipeline preset (``pipe.yaml``, float32) naming the tiny SD teacher saved to disk, once per test module."""
    from tiny_models import make_tiny_teacher_spec

    return make_tiny_teacher_spec(tmp_path_factory.mktemp("front"))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after a test that builds Trainers (each builds an
    Accelerator)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()
