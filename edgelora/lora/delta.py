"""ΔW = s·B·A in fp32, one function per layout the weight is stored in, and the task delta's module type.

The exporter (merge before baking, patching an engine) and the on-device runtime (rebuilding a weight on
a swap) both compute ΔW here, so a weight the runtime rebuilds is bit for bit the weight baked into the
task engine. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeltaModule:
    """One module of a task delta: ``W = W0 + scale · B @ A`` with A (r, in), B (out, r)."""

    module: str
    A: np.ndarray
    B: np.ndarray
    scale: float


def lora_delta_in_out(A: np.ndarray, B: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """``ΔWᵀ = Aᵀ @ (s·B)ᵀ`` as (in, out), fp32: the delta of a weight the device stores (in, out).

    One definition per layout, shared with the exporter (``edgelora.merge.delta`` merges in the layout
    the target's swap graph feeds), so a weight the runtime rebuilds is bit for bit the weight baked into
    the task engine (and int8 re-quantization of it gives the baked engine's int8 values). The two
    layouts' products differ in the last bit (BLAS orders the sums differently), hence two functions."""
    A = np.asarray(A, np.float32)
    sB = np.asarray(B, np.float32) * np.float32(scale)  # scale the small (out, r) factor, not the (in, out) product
    return np.matmul(A.T, sB.T, out=out)


def lora_delta_out_in(A: np.ndarray, B: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """``ΔW = (s·B) @ A`` as (out, in), fp32: the delta of a weight the device stores (out, in) (fp32 swap
    graphs feed their weights so: a decode step reads them faster, see ``converters/onnx/swap.py``)."""
    A = np.asarray(A, np.float32)
    sB = np.asarray(B, np.float32) * np.float32(scale)
    return np.matmul(sB, A, out=out)


LAYOUTS = {"in_out": lora_delta_in_out, "out_in": lora_delta_out_in}
