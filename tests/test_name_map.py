"""The name map finds weights by content: whole, transposed, or a slice of a packed q/k/v weight."""

from __future__ import annotations

import numpy as np
import pytest
from edgelora.converters.onnx.names import NameMapError, WeightLocation, build_name_map
from onnx import helper, numpy_helper


def _model(**inits: np.ndarray):
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph)


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_whole_and_transposed_weights():
    a, b = _w(8, 6, seed=1), _w(4, 6, seed=2)
    found = build_name_map(_model(x=a, y=b.T.copy()), {"a": a, "b": b})
    assert found["a"] == WeightLocation("x", (8, 6), False)
    assert found["b"] == WeightLocation("y", (6, 4), True)


def test_packed_qkv_slices_including_grouped_kv():
    q, k, v = _w(8, 6, seed=1), _w(4, 6, seed=2), _w(4, 6, seed=3)  # GQA: k, v narrower than q
    packed = np.concatenate([q.T, k.T, v.T], axis=1)
    found = build_name_map(_model(qkv=packed), {"q": q, "k": k, "v": v})
    assert [found[n].slice for n in "qkv"] == [(0, 8), (8, 12), (12, 16)]
    # read/write round trip through the packed array
    arr = packed.copy()
    found["k"].write(arr, found["k"].read(arr) + 1)
    np.testing.assert_array_equal(arr[:, 8:12], k.T + 1)
    np.testing.assert_array_equal(arr[:, :8], q.T)


def test_a_weight_that_is_nowhere_is_an_error():
    with pytest.raises(NameMapError, match="'layer.q'.*no ONNX initializer"):
        build_name_map(_model(x=_w(8, 6)), {"layer.q": _w(8, 6, seed=9)})


def test_a_weight_held_twice_is_an_error():
    a = _w(8, 6)
    with pytest.raises(NameMapError, match="matches 2 places"):
        build_name_map(_model(x=a, y=a.T.copy()), {"head": a})
