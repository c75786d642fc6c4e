"""Export of SPANet models: ``torch.export`` and ONNX (``torch.onnx.export(dynamo=True)``).

``torch.export`` keeps ``spanet::spg_aggregate`` as one custom-op node (it has a
fake kernel). ONNX has no such operator, so :func:`export_decompositions`
rewrites the node into standard ATen ops along the low-rank path
(:func:`spanet_ops.algorithms.spg_lowrank`): the dense 1x1 GEMM with the
concatenated weight scaled per channel by ``1 - lam``, plus the
coefficient-space spectral correction (projection on the disc's real basis
images, per-channel scale, channel mix, synthesis). The basis comes from
:mod:`spanet_ops`' cached plans and enters the graph as a constant for the
exported input size.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from spanet_ops import algorithms
from spanet_ops.plans import circular_plan_constants
from spanet_ops.validation import compute_dtype

__all__ = ["export_decompositions", "export_program", "export_onnx"]


def _spg_aggregate_lowrank(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lam: Tensor, radius: float, algorithm: str
) -> Tensor:
    """``spanet::spg_aggregate`` in ATen ops, on the low-rank path (exact for every ``algorithm``)."""
    dtype = compute_dtype(x.dtype)
    plan = circular_plan_constants(x.shape[-2], x.shape[-1], radius, dtype, x.device)
    scale, constant = plan.coefficient_scales(lam)
    bias = None if bias is None else bias.to(dtype)
    out = algorithms.spg_lowrank(x.to(dtype), weight.to(dtype), bias, plan.real_basis, scale, constant, inplace=False)
    return out.to(x.dtype)


def export_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """Decompositions of the spanet ops the models use, for ``ExportedProgram.run_decompositions``."""
    return {torch.ops.spanet.spg_aggregate.default: _spg_aggregate_lowrank}


def export_program(model: torch.nn.Module, example_inputs: Sequence[Tensor], decompose: bool = False):
    """``torch.export.export(model, example_inputs)``; with ``decompose`` the spanet ops become ATen ops."""
    program = torch.export.export(model, tuple(example_inputs))
    return program.run_decompositions(export_decompositions()) if decompose else program


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Tensor], path: Optional[str] = None, **kwargs):
    """Export ``model`` to ONNX with ``torch.onnx.export(dynamo=True)``; needs ``onnx`` and ``onnxscript``.

    The spanet ops are decomposed first (see :func:`export_decompositions`).
    Returns the ``torch.onnx.ONNXProgram``; with ``path`` it is also saved there.
    Extra keyword arguments go to ``torch.onnx.export``.
    """
    program = export_program(model, example_inputs, decompose=True)
    onnx_program = torch.onnx.export(program, tuple(example_inputs), dynamo=True, **kwargs)
    if path is not None:
        onnx_program.save(path)
    return onnx_program
