"""``scripts/gpu_check.sh --smoke``: the one-shot GPU check's code paths, on the CPU, in CI.

The smoke run uses Triton's interpreter and tiny sizes; this test checks that it
finishes, that every section ran, and that what it measured is right (the kernel
against float64 arithmetic, the first-call record against the autotuning buckets,
the models' figures positive and their ratios consistent).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    return done, out


def test_smoke_run_succeeds_and_writes_results(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for name in ("gpu_check.json", "gpu_check.md", "tests.xml", "steps.log", "environment.log"):
        assert (out / name).is_file(), name
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["smoke"] is True
    for section in ("environment", "kernels", "first_call", "sync", "models"):
        assert results[section]["ok"], (section, results[section].get("traceback"))
    assert results["environment"]["result"]["triton_interpret"] == "1"
    markdown = (out / "gpu_check.md").read_text()
    assert "| shape | dtype | variant |" in markdown and "| model | mode |" in markdown


def test_smoke_kernels_are_exact(smoke):
    _, out = smoke
    rows = json.loads((out / "gpu_check.json").read_text())["kernels"]["result"]
    kernel = [row for row in rows if row["variant"] == "kernel"]
    assert {(row["shape"], row["dtype"]) for row in kernel} == {
        (f"{b}x{c}x{s}x{s}", d) for b in (1, 2) for c, s, _ in ((6, 14, 2.0), (9, 7, 1.0)) for d in ("float32", "bfloat16")
    }
    for row in kernel:  # float32 arithmetic; bfloat16 rounding of results of order 1-4
        assert row["error"] < (1e-5 if row["dtype"] == "float32" else 2e-2), row
    assert all(row["of copy"] > 0 for row in rows)


def test_smoke_first_calls_and_models(smoke):
    _, out = smoke
    results = json.loads((out / "gpu_check.json").read_text())
    first = results["first_call"]["result"]
    assert [row["planes"] for row in first] == [9, 18, 27] * 2
    assert not any(row["tuned"] for row in first)  # the interpreter runs one fixed configuration
    assert results["sync"]["result"] == {"skipped": "needs a CUDA device"}
    models = results["models"]["result"]
    assert {(row["model"], row["mode"]) for row in models} == {
        (m, mode) for m in ("spanet_small", "spanet_small:reference", "convnext_tiny") for mode in ("train", "infer")
    }
    for row in models:
        assert row["images_per_s"] > 0
        if row["model"] == "convnext_tiny":
            assert row["vs_convnext_tiny"] == pytest.approx(1.0)
