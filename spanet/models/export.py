"""Export of SPANet models: ``torch.export`` and ONNX (``torch.onnx.export(dynamo=True)``).

``torch.export`` keeps ``spanet::spg_aggregate`` as one custom-op node (it has a
fake kernel). ONNX has no such operator, so :func:`export_decompositions`
rewrites the node into standard ATen ops along the low-rank path
(:func:`spanet_ops.algorithms.spg_lowrank`): the dense 1x1 GEMM with the
concatenated weight scaled per channel by ``1 - lam``, plus the
coefficient-space spectral correction (projection on the disc's real basis
images, per-channel scale, channel mix, synthesis). The basis comes from
:mod:`spanet_ops`' cached plans and enters the graph as a constant for the
exported input size, so the batch dim alone can be dynamic.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from spanet_ops import algorithms
from spanet_ops.plans import circular_plan
from spanet_ops.validation import compute_dtype

__all__ = ["export_decompositions", "export_program", "export_onnx"]


def _spg_aggregate_lowrank(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lams, radius: float, algorithm: str
) -> Tensor:
    """``spanet::spg_aggregate`` in ATen ops, on the low-rank path (exact for every ``algorithm``)."""
    dtype = compute_dtype(x.dtype)
    # The plan is geometry only: built from real tensors outside the tracer, it enters the graph as constants.
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        plan = circular_plan(int(x.shape[-2]), int(x.shape[-1]), float(radius), tuple(lams), int(x.shape[1]), dtype,
                             x.device)
        basis, scale, constant = (t.clone() for t in plan.spg_terms)
    bias = None if bias is None else bias.to(dtype)
    out = algorithms.spg_lowrank(x.to(dtype), weight.to(dtype), bias, basis, scale, constant, inplace=False)
    return out.to(x.dtype)


def export_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """Decompositions of the spanet ops the models use, for ``ExportedProgram.run_decompositions``."""
    return {torch.ops.spanet.spg_aggregate.default: _spg_aggregate_lowrank}


def _check_dynamic_shapes(dynamic_shapes: Any) -> None:
    """Allow a dynamic batch dim only: the spectral basis is built for the exported height and width."""

    def visit(spec) -> None:
        if isinstance(spec, dict):
            for key, value in spec.items():
                if isinstance(key, int):
                    if key != 0 and value is not None:
                        raise ValueError(
                            f"dynamic_shapes: dim {key} cannot be dynamic; only the batch dim (0) can, since the "
                            "spectral basis is built for the exported height and width (export once per size)"
                        )
                else:
                    visit(value)
        elif isinstance(spec, (list, tuple)):
            for value in spec:
                visit(value)

    visit(dynamic_shapes)


def export_program(
    model: torch.nn.Module, example_inputs: Sequence[Tensor], decompose: bool = False, dynamic_shapes: Any = None
):
    """``torch.export.export(model, example_inputs)``; with ``decompose`` the spanet ops become ATen ops.

    ``dynamic_shapes`` (``torch.export``'s argument) may make the batch dim dynamic,
    e.g. ``({0: torch.export.Dim("batch")},)``; other dims raise ``ValueError``.
    """
    _check_dynamic_shapes(dynamic_shapes)
    program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    return program.run_decompositions(export_decompositions()) if decompose else program


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    path: Optional[str] = None,
    dynamic_shapes: Any = None,
    **kwargs,
):
    """Export ``model`` to ONNX with ``torch.onnx.export(dynamo=True)``; needs ``onnx`` and ``onnxscript``.

    The spanet ops are decomposed first (see :func:`export_decompositions`).
    ``dynamic_shapes`` may make the batch dim dynamic (see :func:`export_program`).
    Returns the ``torch.onnx.ONNXProgram``; with ``path`` it is also saved there.
    Extra keyword arguments go to ``torch.onnx.export``.
    """
    program = export_program(model, example_inputs, decompose=True, dynamic_shapes=dynamic_shapes)
    onnx_program = torch.onnx.export(program, tuple(example_inputs), dynamo=True, **kwargs)
    if path is not None:
        onnx_program.save(path)
    return onnx_program
