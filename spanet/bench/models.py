"""Module and model levels: SPAM fast vs reference, and whole-model throughput and peak memory.

Models are named as in timm's registry (``import spanet`` registers
``spanet_*``). A SPANet model may carry its SPAM context path after a colon:
``spanet_small`` (default ``fused``), ``spanet_small:reference`` (the
published per-chunk FFT path), ``spanet_small:fft`` or ``spanet_small:lowrank``
— the model's ``spectral_impl`` argument (:data:`spanet.models.SPECTRAL_IMPLS`).
Every model is built with ``timm.create_model(name, pretrained=False)``.

Throughput:

* *inference*: ``model.eval()`` under ``torch.inference_mode()``, one forward.
* *training*: ``model.train()``, forward, cross-entropy on random labels,
  backward and an AdamW step (the published optimizer), gradients set to None.

Images per second = batch / median step time; the models of one run are
timed interleaved, so their ratios share the machine's load.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measure import Stats, paired_ratio, peak_step_memory, tensor_bytes, time_interleaved, timing_summary
from .operators import DTYPES, MODES, StageShape

#: spanet_small and the models of its size (about 25-30 M parameters, 4-5 GMACs) users pick instead.
DEFAULT_MODELS = (
    "spanet_small",
    "spanet_small:reference",
    "convnext_tiny",
    "poolformer_s24",
    "focalnet_tiny_srf",
    "convformer_s18",
)
#: The model every other is compared with.
DEFAULT_BASELINE_MODEL = "spanet_small"
MODEL_MODES = ("train", "infer")
#: SPAM paths timed at the module level (``fused`` is the default, what users get).
MODULE_IMPLS = ("reference", "fft", "fused")


def _spectral_impls() -> Tuple[str, ...]:
    from spanet.models import SPECTRAL_IMPLS

    return tuple(SPECTRAL_IMPLS)


def split_model_name(name: str) -> Tuple[str, Dict[str, object]]:
    """``"spanet_small:reference"`` -> ``("spanet_small", {"spectral_impl": "reference"})``; checks the name.

    Raises:
        ValueError: the model is not in timm's registry, or a ``:impl`` suffix
            is unknown or given to a model that is not a SPANet.
    """
    import timm

    import spanet  # noqa: F401  (registers the spanet_* models in timm)

    base, _, impl = name.partition(":")
    if not timm.is_model(base):
        close = [m for m in timm.list_models(f"*{base.split('_')[0]}*")][:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {base!r}: not in timm's model registry{hint}")
    if not impl:
        return base, {}
    if not base.startswith("spanet_"):
        raise ValueError(f"model {name!r}: a ':impl' suffix applies to spanet_* models only")
    if impl not in _spectral_impls():
        raise ValueError(f"model {name!r}: unknown spectral_impl {impl!r}; expected one of {', '.join(_spectral_impls())}")
    return base, {"spectral_impl": impl}


def create_model(name: str, device: torch.device) -> nn.Module:
    """Build ``name`` (see module doc) with random weights on ``device``."""
    import timm

    base, kwargs = split_model_name(name)
    return timm.create_model(base, pretrained=False, **kwargs).to(device)


# --------------------------------------------------------------------------- module level (SPAM)


def spam_candidates(
    stage: StageShape,
    batch: int,
    dtype: torch.dtype,
    mode: str,
    device: torch.device,
    impls: Sequence[str] = MODULE_IMPLS,
    seed: int = 0,
) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables running one SPAM (same weights) with each ``spectral_impl``.

    ``reference`` runs in float32 (``torch.fft`` has no bf16 CPU kernels); the
    others in ``dtype``.
    """
    from spanet.models import SPAM

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    torch.manual_seed(seed)
    base = SPAM(stage.channels, radius=stage.radius, filter_size=stage.size).to(device)
    x32 = torch.randn(batch, stage.channels, stage.size, stage.size, generator=torch.Generator().manual_seed(seed))
    x32 = x32.to(device)
    candidates = {}
    for impl in impls:
        module = copy.deepcopy(base)
        module.spectral_impl = impl
        run_dtype = torch.float32 if impl == "reference" else dtype
        module = module.to(run_dtype)
        x = x32.to(run_dtype).requires_grad_(mode == "fwd+bwd")
        candidates[impl] = _module_runner(module, x, mode)
    return candidates


def _module_runner(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return module(x)

        return forward
    grad = []

    def forward_backward():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return forward_backward


def run_modules(
    *,
    stages: Sequence[StageShape],
    batch: int,
    dtypes: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    progress: Callable[[str], None] = lambda line: None,
) -> List[dict]:
    """Time SPAM's context paths at every (stage, dtype, mode); one JSON-ready row per case."""
    rows = []
    for stage in stages:
        for dtype_name in dtypes:
            for mode in modes:
                candidates = spam_candidates(stage, batch, DTYPES[dtype_name], mode, device)
                samples = time_interleaved(
                    candidates, device=device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s
                )
                row = {
                    "module": "SPAM",
                    "shape": [batch, stage.channels, stage.size, stage.size],
                    "radius": stage.radius,
                    "dtype": dtype_name,
                    "mode": mode,
                    "baseline": "reference",
                    "baseline_dtype": "fp32",
                    **timing_summary(samples),
                }
                rows.append(row)
                progress(
                    f"{'SPAM':>20} {stage.label(batch):>24} {dtype_name:>4} {mode:>7}  "
                    f"ref {row['time_ms']['reference']['median']:8.2f} ms  fused x{row['speedup']['fused']['median']:.2f}"
                )
    return rows


# --------------------------------------------------------------------------- model level


@dataclass
class ModelStep:
    """One model ready to time: its step callable and what it keeps resident."""

    name: str
    model: nn.Module
    step: Callable[[], object]
    resident_bytes: int
    params: int


def model_step(name: str, mode: str, batch: int, resolution: int, device: torch.device, amp: bool) -> ModelStep:
    """Build model ``name`` and its ``"train"`` or ``"infer"`` step (see module doc)."""
    if mode not in MODEL_MODES:
        raise ValueError(f"unknown model mode {mode!r}; expected one of {', '.join(MODEL_MODES)}")
    model = create_model(name, device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    num_classes = getattr(model, "num_classes", 1000)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    params = sum(p.numel() for p in model.parameters())
    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                return model(images)

        resident = tensor_bytes([*model.parameters(), *model.buffers(), images])
        return ModelStep(name, model, infer, resident, params)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def train():
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # One step creates the optimizer state, so that "resident" counts it.
    train()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident = tensor_bytes([*model.parameters(), *model.buffers(), images, labels, *state])
    return ModelStep(name, model, train, resident, params)


def run_models(
    *,
    names: Sequence[str],
    modes: Sequence[str],
    batch: int,
    resolution: int,
    device: torch.device,
    amp: bool,
    warmup: int,
    repeats: int,
    baseline: str = DEFAULT_BASELINE_MODEL,
    progress: Callable[[str], None] = lambda line: None,
) -> List[dict]:
    """Throughput (images/s) and peak step memory of every model, per mode; one row per (model, mode).

    Models of one mode are timed interleaved; each row's ``relative`` is the
    paired ratio of its throughput to ``baseline``'s (when ``baseline`` is
    among ``names``).
    """
    for name in names:
        split_model_name(name)  # fail early, before minutes of timing, on a bad name
    rows = []
    for mode in modes:
        steps = {name: model_step(name, mode, batch, resolution, device, amp) for name in names}
        samples = time_interleaved(
            {name: s.step for name, s in steps.items()}, device=device, warmup=warmup, repeats=repeats
        )
        for name, step in steps.items():
            stats = Stats.of(samples[name])
            peak = peak_step_memory(step.step, device)
            row = {
                "model": name,
                "mode": mode,
                "batch": batch,
                "resolution": resolution,
                "amp_bf16": amp,
                "params_m": step.params / 1e6,
                "step_ms": stats.scaled(1e3),
                "images_per_s": {
                    "median": batch / stats.median,
                    "q1": batch / stats.q3,
                    "q3": batch / stats.q1,
                    "min": batch / stats.max,
                    "max": batch / stats.min,
                },
                "peak_step_memory_mib": peak / 2**20,
                "resident_memory_mib": step.resident_bytes / 2**20,
                "baseline": baseline if baseline in samples else None,
                # ratio of throughputs = inverse ratio of step times.
                "relative": paired_ratio(samples[baseline], samples[name]) if baseline in samples else None,
            }
            rows.append(row)
            progress(
                f"model {name:>24} {mode:>5}  {row['images_per_s']['median']:8.2f} img/s  "
                f"peak {row['peak_step_memory_mib']:8.1f} MiB  params {row['params_m']:.1f} M"
            )
        del steps
    return rows
