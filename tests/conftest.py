"""Shared test configuration: slow tests run only with SPANET_SLOW=1 (or ``-m slow``)."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SPANET_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip_slow = pytest.mark.skip(reason="slow test: set SPANET_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_configure(config):
    # The tests use small tensors: on a 2-core machine shared with other jobs, OpenMP
    # barriers between two threads cost far more than they save (a 30x30 matmul can
    # take 40 ms instead of 0.01 ms under load).
    import torch

    torch.set_num_threads(1)
