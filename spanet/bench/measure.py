"""Measurement: interleaved timing, robust statistics, peak memory, and the machine record.

Timing method
-------------
Every comparison times its candidates in the same process, interleaved: each
round runs every candidate once (the order rotates from round to round, so no
candidate always runs first after a pause), after a warm-up of every
candidate. A sample is the mean over ``number`` back-to-back calls, with
``number`` chosen at warm-up so that one sample lasts at least
``min_sample_s`` (short operators are otherwise dominated by timer
resolution). On CUDA a sample is bracketed by CUDA events after a
synchronisation; on CPU by ``time.perf_counter``.

Reported: the median sample with its interquartile range and min/max, and
for a comparison the median of the per-round paired ratios ``t_base / t_cand``
with their IQR — pairing within a round cancels load from other processes,
which hits both candidates of a round alike.

Peak memory method
------------------
* CUDA: ``torch.cuda.max_memory_allocated()`` over one step after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at its start.
* CPU: torch's CPU allocator has no peak counter, and ``ru_maxrss`` only
  ever grows (so its deltas vanish after the first large model). We profile
  one step with ``torch.profiler`` (``profile_memory=True``), sort its
  allocator events by time and take the maximum of the running sum of
  allocated (+) and freed (-) bytes: the peak of tensor memory above what was
  live when the step began. Memory outside torch's allocator (e.g. oneDNN
  scratch, Python objects) is not counted.

Both report the step's *transient* peak; the memory live before the step
(parameters, gradients, optimizer state, inputs) is reported apart as
``resident``.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

#: Lines Kineto writes to stderr on every profiler start/stop (and, without a GPU, a
#: device-count complaint); the CPU memory measurement profiles once per model, so
#: they are filtered out of what the step writes to stderr.
_KINETO_CHATTER = ("profiler_start", "profiler_stop", "gpuGetDeviceCount")


@dataclass(frozen=True)
class Stats:
    """Summary of timing samples (seconds): median, quartiles, extremes and count."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        """Summarise a non-empty sequence of samples."""
        if not samples:
            raise ValueError("no samples to summarise")
        ordered = sorted(float(s) for s in samples)
        q1, q3 = _quartiles(ordered)
        return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))

    def scaled(self, factor: float) -> Dict[str, float]:
        """The statistics multiplied by ``factor`` (e.g. 1e3 for milliseconds) as a dict."""
        return {
            "median": self.median * factor,
            "q1": self.q1 * factor,
            "q3": self.q3 * factor,
            "min": self.min * factor,
            "max": self.max * factor,
            "n": self.n,
        }


def _quartiles(ordered: Sequence[float]):
    # Linear interpolation between order statistics (numpy's default), well
    # defined for a single sample too.
    def at(q):
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.25), at(0.75)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Mean seconds per call over ``number`` back-to-back calls of ``fn``."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / number
    begin = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - begin) / number


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    min_sample_s: float = 0.0,
) -> Dict[str, List[float]]:
    """Time ``candidates`` (name -> zero-argument callable) interleaved; return seconds per call.

    Every candidate is warmed up ``warmup`` times (at least once: the first
    call builds plans and caches) and, if ``min_sample_s > 0``, timed once
    more to size its samples; then ``repeats`` rounds each take one sample of every candidate, rotating
    the order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    number = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            candidates[name]()
        number[name] = 1
        if min_sample_s > 0:
            once = _time_calls(candidates[name], 1, device)  # warm, to size the samples
            number[name] = max(1, math.ceil(min_sample_s / once)) if once > 0 else 1
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_time_calls(candidates[name], number[name], device))
    return samples


def paired_ratio(base: Sequence[float], cand: Sequence[float]) -> Dict[str, float]:
    """Median and IQR of the per-round ratios ``base / cand`` (> 1: the candidate is faster)."""
    ratios = sorted(b / c for b, c in zip(base, cand))
    q1, q3 = _quartiles(ratios)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


# --------------------------------------------------------------------------- memory


def timing_summary(samples: Mapping[str, Sequence[float]], baseline: str = "reference") -> Dict[str, dict]:
    """JSON-ready ``time_ms`` (stats per candidate) and ``speedup`` (paired ratio over ``baseline``)."""
    return {
        "time_ms": {name: Stats.of(s).scaled(1e3) for name, s in samples.items()},
        "speedup": {name: paired_ratio(samples[baseline], s) for name, s in samples.items() if name != baseline},
    }


def tensor_bytes(tensors) -> int:
    """Total bytes of the distinct storages behind ``tensors`` (None entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_step_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step`` above those live at its start (see module doc)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@contextmanager
def _without_kineto_chatter():
    """Capture file descriptor 2 (Kineto's C++ logging bypasses ``sys.stderr``) and replay all but its chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in _KINETO_CHATTER):
                    sys.stderr.write(line)


# --------------------------------------------------------------------------- machine record


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info(device: torch.device) -> Dict[str, object]:
    """What ran the benchmark: CPU, threads, GPU, versions of torch/triton/timm/spanet, kernels present."""
    import spanet
    import spanet_ops

    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda if device.type == "cuda" else None,
        "triton": triton_version,
        "timm": _version("timm"),
        "spanet": spanet.__version__,
        "spanet_ops": spanet_ops.__version__,
        "git_commit": _git_commit(),
        "kernels": {name: entry["available"] for name, entry in spanet_ops.backends().items()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


def machine_line(info: Mapping[str, object]) -> str:
    """One line naming the machine and versions, for tables."""
    where = f"{info['cpu']} ({info['torch_threads']} threads)"
    if info.get("gpu"):
        where = f"{info['gpu']}, host {where}"
    kernels = ", ".join(k for k, v in dict(info.get("kernels", {})).items() if v)
    return (
        f"{where}; torch {info['torch']}, triton {info['triton']}, timm {info['timm']}, "
        f"spanet {info['spanet']} ({info.get('git_commit') or 'no git'}); kernels: {kernels}"
    )
