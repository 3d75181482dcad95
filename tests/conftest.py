"""Shared test set-up: Triton runs through its interpreter when no GPU is present, every test is seeded."""

import os
import random

import numpy as np
import pytest
import torch

# Must happen before anything imports triton (kernels read it at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        skip_cpu_kernels = pytest.mark.skip(
            reason="runs the Triton kernels on CPU tensors through the interpreter "
            "(TRITON_INTERPRET=1); on a GPU the kernel tests run on CUDA"
        )
        for item in items:
            if "interpreter" in item.keywords:
                item.add_marker(skip_cpu_kernels)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; the same checks run on CPU through the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
