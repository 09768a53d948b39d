"""ONNX -> the swap graph: a base graph with every LoRA-target initializer turned into a graph input.

The on-device runtime swaps tasks by rebuilding ``W0 + s·B·A`` into buffers it owns and feeding them
to this graph (``base/swap.onnx``). Why inputs and not user-owned initializers: ONNX Runtime prepacks
constant MatMul weights at session start and never looks at the original buffer again, so in-place
edits are invisible; turning prepacking off for the whole session costs ~1.17x on W1, while feeding
only the LoRA-target weights costs only their own packing (~1.03-1.05x on W1 encoders, ~1.1x at a
decode step). See ``benchmarks/README.md`` for the measurements.

Each targeted initializer is fed in the base engine's precision, by a recipe the runtime applies
after the fp32 merge (the runtime never imports onnx, so everything it needs is in the manifest):

- ``float32`` / ``float16``: ``W0 + ΔW`` (cast);
- ``int8``: ONNX Runtime's dynamic-quantization recipe, per output column, symmetric:
  ``scale = max|w| / 127``, ``q = clip(rint(w / scale), -127, 127)``, zero point 0. The exporter
  checks here that this recipe reproduces the quantizer's own int8 W0 bit for bit; if it does
  not, the weight is not swappable and the reason is recorded.

Other encodings (int4 ``MatMulNBits`` blocks) are not rebuilt on the device: a swap would need the
quantizer's block search; those targets run tasks unmerged on ``base/lora.onnx`` instead.

API: ``make_swap_graph(engine, dst, fp32_weights, locations) -> (manifest entry | None, reason | None)``.
``engine`` is loaded without its external data and ``dst`` written beside it, so the swap graph points
into the same data file (no second copy of the weights on disk): the base engine's, or for fp32 the
unfused graph's (``base/lora.onnx.data``, see ``edgelora.export._swap_graph``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.runtime.swap import int8_per_column

from .onnx_names import WeightLocation


def make_swap_graph(engine: Path, dst: Path, fp32_weights: Mapping[str, np.ndarray],
                    locations: Mapping[str, WeightLocation]) -> tuple[dict[str, Any] | None, str | None]:
    """Write ``dst`` beside ``engine`` (same folder, same external data) with the initializers that hold
    LoRA targets as inputs. ``fp32_weights``: those initializers from the fp32 graph the name map was
    built on. Returns the manifest's ``swap`` entry, or ``(None, reason)`` when a weight cannot be fed."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(engine), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    weights: dict[str, Any] = {}
    for name in sorted({loc.initializer for loc in locations.values()}):
        w0 = fp32_weights[name]
        transposed = {loc.transposed for loc in locations.values() if loc.initializer == name}
        if name in inits and inits[name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            recipe = "float32" if inits[name].data_type == TensorProto.FLOAT else "float16"
            weights[name] = {"recipe": recipe, "inputs": {"weight": name}, "shape": list(w0.shape)}
        elif f"{name}_quantized" in inits and f"{name}_scale" in inits:
            q_init, s_init = inits[f"{name}_quantized"], inits[f"{name}_scale"]
            zp = inits.get(f"{name}_zero_point")
            stored = _array(q_init, engine)
            scale = _array(s_init, engine)
            if (q_init.data_type != TensorProto.INT8 or transposed != {True} or scale.shape != (w0.shape[1],)
                    or (zp is not None and np.any(_array(zp, engine)))):
                return None, f"{name}: int8 layout is not per-column symmetric over a (in, out) weight"
            q, s = int8_per_column(w0)
            if not (np.array_equal(q, stored) and np.array_equal(s, scale)):
                return None, f"{name}: the int8 recipe does not reproduce the quantizer's weights bit for bit"
            weights[name] = {"recipe": "int8", "inputs": {"weight": f"{name}_quantized", "scale": f"{name}_scale"},
                             "shape": list(w0.shape)}
        else:
            return None, (f"{name}: stored as {_encoding(inits, name)}, which the runtime does not rebuild; "
                          "tasks run unmerged on base/lora.onnx")
    fed = {n for w in weights.values() for n in w["inputs"].values()}
    keep = [i for i in model.graph.initializer if i.name not in fed]
    for name in sorted(fed):
        init = inits[name]
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(dst))
    return {"weights": weights}, None


def _array(init: Any, engine: Path) -> np.ndarray:
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(init):
        init = type(init).FromString(init.SerializeToString())
        load_external_data_for_tensor(init, str(engine.parent))
    return numpy_helper.to_array(init)


def _encoding(inits: Mapping[str, Any], name: str) -> str:
    found = sorted(n for n in inits if n.startswith(name))
    return ", ".join(found[:3]) if found else "no initializer of that name (folded by the quantizer)"
