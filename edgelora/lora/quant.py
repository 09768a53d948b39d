"""The weight encodings a swap or a patched bake re-applies after the fp32 merge, matching the quantizer's
own output bit for bit (checked by the exporter against the engine it wrote). numpy only.

- ``int8``: ONNX Runtime's dynamic quantization of a (in, out) MatMul weight, per output column,
  symmetric: ``scale = max|w| / 127`` (as ``2 · max|w| / 254``), ``q = clip(rint(w / scale), -127, 127)``.
"""

from __future__ import annotations

import numpy as np


def int8_per_column(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's symmetric per-channel int8 for a (in, out) MatMul weight: (q int8, scale (out,))."""
    amax = np.abs(w).max(axis=0).astype(np.float32)
    scale = (amax * np.float32(2.0) / np.float32(254.0)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)  # as the quantizer does
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale




def int8_per_column_into(w: np.ndarray, q_out: np.ndarray) -> np.ndarray:
    """:func:`int8_per_column` with ``w`` as scratch (overwritten) and the int8 values written to ``q_out``;
    returns the scales. Same arithmetic, fewer passes and no temporaries of ``w``'s size."""
    amax = np.maximum(w.max(axis=0), -w.min(axis=0)).astype(np.float32)
    scale = (amax * np.float32(2.0) / np.float32(254.0)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)
    np.divide(w, scale, out=w)
    np.rint(w, out=w)
    np.clip(w, -127, 127, out=w)
    np.copyto(q_out, w, casting="unsafe")
    return scale
