"""Test-wide settings: offline, and one torch thread per test process (pytest-xdist runs one process per core;
oversubscribed OpenMP threads make tiny models orders of magnitude slower)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
