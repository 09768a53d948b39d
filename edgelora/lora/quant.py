"""The weight encodings a swap or a patched bake re-applies after the fp32 merge, matching the quantizer's
own output bit for bit (checked by the exporter against the engine it wrote). numpy only.

All three are symmetric per output column of a (in, out) MatMul weight, ``q = clip(rint(w / scale), -L, L)``:

- ``int8``: ONNX Runtime's dynamic quantization, ``scale = max|w| / 127`` (as ``2 · max|w| / 254``), L = 127.
- ``int8-reduced``: the same with ONNX Runtime's ``reduce_range`` (7-bit weights), ``scale = max|w| / 64``, L = 64.
- ``int8-pairsafe`` (edgelora's targets): ``scale = m / 127`` where ``m`` is the column's largest
  ``|w[2k]| + |w[2k+1]|``, L = 127.

Why ``int8-pairsafe``: a CPU with AVX2 (or AVX-512) but without VNNI multiplies uint8 activations by int8
weights with ``vpmaddubsw``, which adds each pair of u8·s8 products along K (rows 2k and 2k+1: measured) into a
*saturating* 16-bit lane. Two products of 255·127 sum to 64,770 > 32,767, so a full-range int8 engine can come
back wrong there (a K = 64 dot product of 255s and 127s gives 1,048,544 instead of 2,072,640), while VNNI
(``vpdpbusd``), AMX and ARM's kernels accumulate in 32 bits and never saturate. With every pair's
``|q[2k]| + |q[2k+1]| ≤ 128`` (rint adds at most ½ to each of two values whose exact sum is ≤ 127) a pair is at
most 255 · 128 = 32,640: exact on every kernel, with the same int8 values and kernels (VNNI and AMX speed kept).
It costs a column the ratio of its largest pair to its largest value in step size — ~1.2-1.4× on trained
weights, where ``reduce_range`` costs 2× (W1 AG News: logits cosine 0.948 at 7 bits vs 0.98 at 8).
:func:`max_pair_sum` is the bound, checked by the exporter on every integer MatMul weight.
"""

from __future__ import annotations

import numpy as np

INT8_LEVELS = {"int8": 127, "int8-reduced": 64, "int8-pairsafe": 127}  # recipe -> largest |q|
SATURATING_PAIR = 32767  # an AVX2 vpmaddubsw lane: a pair of u8·s8 products, saturated to int16
PAIR_LIMIT = 128  # |q[2k]| + |q[2k+1]| ≤ this keeps 255 · pair ≤ 32,767


def _pair_max(w: np.ndarray) -> np.ndarray:
    """Per column, the largest ``|w[2k]| + |w[2k+1]|`` over the rows (an odd last row pairs with zero)."""
    k = w.shape[0] - w.shape[0] % 2
    m = np.abs(w[0:k:2]) + np.abs(w[1:k:2])
    out = m.max(axis=0) if k else np.zeros(w.shape[1], np.float32)
    if w.shape[0] % 2:
        out = np.maximum(out, np.abs(w[-1]))
    return out.astype(np.float32)


def _scale(w: np.ndarray, recipe: str, amax: np.ndarray | None = None) -> np.ndarray:
    if recipe == "int8-pairsafe":
        top = _pair_max(w)
    else:
        top = (np.abs(w).max(axis=0) if amax is None else amax).astype(np.float32)
    scale = (top * np.float32(2.0) / np.float32(2 * INT8_LEVELS[recipe])).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)  # as the quantizer does


def int8_per_column(w: np.ndarray, recipe: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """``recipe``'s per-channel int8 for a (in, out) MatMul weight: (q int8, scale (out,))."""
    scale = _scale(w, recipe)
    level = INT8_LEVELS[recipe]
    q = np.clip(np.rint(w / scale), -level, level).astype(np.int8)
    return q, scale


def int8_per_column_into(w: np.ndarray, q_out: np.ndarray, recipe: str = "int8") -> np.ndarray:
    """:func:`int8_per_column` with ``w`` as scratch (overwritten) and the int8 values written to ``q_out``;
    returns the scales. Same arithmetic, fewer passes and no temporaries of ``w``'s size (full range)."""
    amax = np.maximum(w.max(axis=0), -w.min(axis=0)) if recipe != "int8-pairsafe" else None
    scale = _scale(w, recipe, amax)
    level = INT8_LEVELS[recipe]
    np.divide(w, scale, out=w)
    np.rint(w, out=w)
    np.clip(w, -level, level, out=w)
    np.copyto(q_out, w, casting="unsafe")
    return scale


def max_pair_sum(q: np.ndarray) -> int:
    """The largest ``|q[2k]| + |q[2k+1]|`` of int8 weights ``q`` ((K, N), the MatMul's B), pairs as the AVX2
    kernels pack them; times 255 (a uint8 activation) it must stay ≤ 32,767 for a non-VNNI kernel to be exact,
    so ≤ :data:`PAIR_LIMIT` is safe on every CPU."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[0] == 0:
        return 0
    return int(_pair_max(np.abs(q.astype(np.int32)).astype(np.float32)).max())


def int8_recipe(w0: np.ndarray, stored: np.ndarray, scale: np.ndarray) -> str | None:
    """The recipe whose per-column encoding of the fp32 weight ``w0`` (in, out) is an engine's ``stored`` int8
    values and ``scale`` bit for bit; None when none is (another layout, or a quantizer we do not reproduce)."""
    if stored.shape != w0.shape or scale.shape != (w0.shape[1],):
        return None
    for recipe in INT8_LEVELS:
        q, s = int8_per_column(w0, recipe)
        if np.array_equal(q, stored) and np.array_equal(s, scale):
            return recipe
    return None
