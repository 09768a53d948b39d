"""The name map: each LoRA target weight of the torch model -> the ONNX initializer holding it.

Exporters rename and transpose weights (``encoder.layer.0.attention.self.query.weight`` becomes
``onnx::MatMul_772``, stored (in, out)), and graph fusions pack q, k, v into one initializer. So the
map is built by content: the torch weight, or its transpose, must equal exactly one initializer, or
one aligned slice of a packed initializer. Anything else (no match, two matches) is an error that
names the module: a delta that cannot be placed must never be placed by guesswork.

API: ``build_name_map(model_proto, weights) -> {module: WeightLocation}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgelora.format.location import WeightLocation  # the one location type (manifest, exporter, runtime)


class NameMapError(ValueError):
    """A target weight has no unique place in the graph."""


def float_initializers(model: Any) -> dict[str, np.ndarray]:
    """Every 2-D float32 initializer of an ONNX ModelProto, as numpy arrays (external data loaded)."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2:
            out[init.name] = numpy_helper.to_array(init)
    return out


def _candidates(w: np.ndarray, name: str, arr: np.ndarray) -> list[WeightLocation]:
    """Places in ``arr`` that hold ``w`` (out, in) exactly: whole, transposed, or an aligned slice."""
    out_dim, in_dim = w.shape
    found = []
    if arr.shape == w.shape and np.array_equal(arr, w):
        found.append(WeightLocation(name, arr.shape, False))
    if arr.shape == (in_dim, out_dim) and np.array_equal(arr, w.T):
        found.append(WeightLocation(name, arr.shape, True))
    if arr.shape[0] == in_dim and arr.shape[1] > out_dim:
        for a in range(0, arr.shape[1] - out_dim + 1, _step(arr.shape[1], out_dim)):
            if np.array_equal(arr[:, a:a + out_dim], w.T):
                found.append(WeightLocation(name, arr.shape, True, (a, a + out_dim)))
    if arr.shape[1] == in_dim and arr.shape[0] > out_dim:
        for a in range(0, arr.shape[0] - out_dim + 1, _step(arr.shape[0], out_dim)):
            if np.array_equal(arr[a:a + out_dim, :], w):
                found.append(WeightLocation(name, arr.shape, False, (a, a + out_dim)))
    return found


def _step(total: int, part: int) -> int:
    """Packed q/k/v slices start at multiples of the smallest head-aligned block (GQA: k, v < q)."""
    from math import gcd

    return max(1, gcd(total, part))


def build_name_map(model: Any, weights: Mapping[str, np.ndarray]) -> dict[str, WeightLocation]:
    """Locate every ``weights[module]`` ((out, in) float32, as the torch Linear stores it) in ``model``."""
    inits = float_initializers(model)
    result: dict[str, WeightLocation] = {}
    for module, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        found: list[WeightLocation] = []
        for name, arr in inits.items():
            if arr.size < w.size or (arr.shape[0] not in w.shape and arr.shape[1] not in w.shape):
                continue
            found += _candidates(w, name, arr)
        if not found:
            raise NameMapError(f"LoRA target {module!r} {tuple(w.shape)}: no ONNX initializer holds its weight; "
                               "the exporter folded or fused it, so it cannot take a delta (export without that "
                               "optimization or drop the module from the adapter)")
        if len(found) > 1:
            where = ", ".join(f"{f.initializer}{list(f.slice) if f.slice else ''}" for f in found[:4])
            raise NameMapError(f"LoRA target {module!r}: its weight matches {len(found)} places ({where}); "
                               "the map would be a guess, so the export stops")
        result[module] = found[0]
    taken: dict[tuple[str, tuple[int, int] | None], str] = {}
    for module, loc in result.items():
        key = (loc.initializer, loc.slice)
        if key in taken:
            raise NameMapError(f"LoRA targets {taken[key]!r} and {module!r} share ONNX initializer "
                               f"{loc.initializer!r}; a delta for one would change the other")
        taken[key] = module
    return result
