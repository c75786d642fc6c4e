"""What the CLI tests share: running a module in a subprocess as this process would, and comparing states bitwise."""
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_env(**extra):
    """This process's environment with the repository importable and the same intra-op thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Same intra-op thread count as this process: bitwise comparisons with in-process runs stay meaningful.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(extra)
    return env


def run_module(module, args, timeout=600, **env):
    """``python -m module *args`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def assert_same_state(a, b):
    """Both state dicts hold the same keys and bitwise-equal tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
