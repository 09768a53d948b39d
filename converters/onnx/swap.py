"""ONNX -> the swap graph: a base graph with every LoRA-target initializer turned into a graph input.

The on-device runtime swaps tasks by rebuilding ``W0 + s·B·A`` into buffers it owns and feeding them
to this graph (``base/swap.onnx``). Why inputs and not user-owned initializers: ONNX Runtime prepacks
constant MatMul weights at session start and never looks at the original buffer again, so in-place
edits are invisible; turning prepacking off for the whole session costs ~1.17x on W1, while feeding
only the LoRA-target weights costs only their own packing (~1.03-1.05x on W1 encoders; at a W2 decode
step ~1.1x as (in, out) weights, ~1.05x as (out, in), below). See ``benchmarks/README.md``.

Each targeted initializer is fed in the base engine's precision, by a recipe the runtime applies
after the fp32 merge (the runtime never imports onnx, so everything it needs is in the manifest):

- ``float32`` / ``float16``: ``W0 + ΔW`` (cast). With ``out_in`` (fp32 targets), a float32 weight whose
  every consumer is a MatMul (or Gemm) reading it as ``B`` is fed as (out, in) instead, its consumers
  reading it transposed (``FusedMatMul``/``Gemm`` with ``transB``): at a decode step (one row) ONNX
  Runtime reads an unpacked (out, in) weight as row dot products, which measured W2's fed-weight tax
  at 1.02-1.06x of the baked engine against 1.08-1.14x for the (in, out) weights MatMul takes; at 128
  rows (W1) the two layouts run alike. The exporter then merges in that layout (``merge.delta``);
- ``int8``: ONNX Runtime's dynamic-quantization recipe, per output column, symmetric:
  ``scale = max|w| / 127``, ``q = clip(rint(w / scale), -127, 127)``, zero point 0. The exporter
  checks here that this recipe reproduces the quantizer's own int8 W0 bit for bit; if it does
  not, the weight is not swappable and the reason is recorded.

Other encodings (int4 ``MatMulNBits`` blocks) are not rebuilt on the device: a swap would need the
quantizer's block search; those targets run tasks unmerged on ``base/lora.onnx`` instead.

API: ``make_swap_graph(engine, dst, fp32_weights, locations, out_in) -> (SwapGraph | None, reason | None)``.
``engine`` is loaded without its external data and ``dst`` written beside it, so the swap graph points
into the same data file (no second copy of the weights on disk): the base engine's, or for fp32 the
unfused graph's (``base/lora.onnx.data``, see ``edgelora.export._swap_graph``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.lora import int8_recipe

from .names import WeightLocation


@dataclass
class SwapGraph:
    """What ``make_swap_graph`` wrote: the manifest's ``weights`` entry, each fed weight's fp32 W0 in the
    layout it is fed in (for ``base/swap_w0.safetensors``) and the modules' locations in those weights."""

    weights: dict[str, Any]
    w0: dict[str, np.ndarray]
    locations: dict[str, WeightLocation]
    # float32 weights: where their W0 already lies in the engine's external data (file name, offset, length,
    # stored transposed relative to how it is fed), so no second copy of it need be written
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)


def make_swap_graph(engine: Path, dst: Path, fp32_weights: Mapping[str, np.ndarray],
                    locations: Mapping[str, WeightLocation], out_in: bool = False
                    ) -> tuple[SwapGraph | None, str | None]:
    """Write ``dst`` beside ``engine`` (same folder, same external data) with the initializers that hold
    LoRA targets as inputs. ``fp32_weights``: those initializers from the fp32 graph the name map was
    built on; ``out_in``: feed float32 MatMul/Gemm weights as (out, in). Returns ``(None, reason)`` when
    a weight cannot be fed."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(engine), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    weights: dict[str, Any] = {}
    w0s: dict[str, np.ndarray] = {}
    sources: dict[str, dict[str, Any]] = {}
    locs = dict(locations)
    flip: set[str] = set()
    for name in sorted({loc.initializer for loc in locations.values()}):
        w0 = fp32_weights[name]
        transposed = {loc.transposed for loc in locations.values() if loc.initializer == name}
        if name in inits and inits[name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            recipe = "float32" if inits[name].data_type == TensorProto.FLOAT else "float16"
            if out_in and recipe == "float32" and transposed == {True} and _reads_as_b(model, name):
                flip.add(name)
                w0 = np.ascontiguousarray(w0.T)
                for m, loc in locations.items():
                    if loc.initializer == name:
                        locs[m] = WeightLocation(name, w0.shape, False, loc.slice)
            weights[name] = {"recipe": recipe, "inputs": {"weight": name}, "shape": list(w0.shape)}
            where = _external(inits[name])
            if recipe == "float32" and where is not None:
                sources[name] = {**where, "transposed": name in flip}
        elif f"{name}_quantized" in inits and f"{name}_scale" in inits:
            q_init, s_init = inits[f"{name}_quantized"], inits[f"{name}_scale"]
            zp = inits.get(f"{name}_zero_point")
            stored = _array(q_init, engine)
            scale = _array(s_init, engine)
            if (q_init.data_type != TensorProto.INT8 or transposed != {True} or scale.shape != (w0.shape[1],)
                    or (zp is not None and np.any(_array(zp, engine)))):
                return None, f"{name}: int8 layout is not per-column symmetric over a (in, out) weight"
            recipe = int8_recipe(w0, stored, scale)
            if recipe is None:
                return None, f"{name}: no int8 recipe reproduces the quantizer's weights bit for bit"
            weights[name] = {"recipe": recipe, "inputs": {"weight": f"{name}_quantized", "scale": f"{name}_scale"},
                             "shape": list(w0.shape)}
        else:
            return None, (f"{name}: stored as {_encoding(inits, name)}, which the runtime does not rebuild; "
                          "tasks run unmerged on base/lora.onnx")
        w0s[name] = w0
    if flip:
        _read_transposed(model, flip)
    fed = {n for w in weights.values() for n in w["inputs"].values()}
    keep = [i for i in model.graph.initializer if i.name not in fed]
    for name in sorted(fed):
        init = inits[name]
        dims = list(reversed(init.dims)) if name in flip else list(init.dims)
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, dims))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(dst))
    return SwapGraph(weights, w0s, locs, sources), None


def _reads_as_b(model: Any, name: str) -> bool:
    """Every consumer of ``name`` is a MatMul or a Gemm (no transA, transB unset) reading it as ``B`` only."""
    users = [n for n in model.graph.node if name in n.input]
    if not users or any(o.name == name for o in model.graph.output):
        return False
    for node in users:
        if list(node.input).count(name) != 1 or len(node.input) < 2 or node.input[1] != name:
            return False
        ints = {a.name: a.i for a in node.attribute if a.type == a.INT}
        if node.op_type == "Gemm" and not (ints.get("transA", 0) == 0 and ints.get("transB", 0) == 0):
            return False
        if node.op_type not in ("MatMul", "Gemm"):
            return False
    return True


def _read_transposed(model: Any, names: set[str]) -> None:
    """Rewire the consumers of ``names`` (now fed (out, in)) to read them transposed: MatMul becomes
    ONNX Runtime's ``FusedMatMul`` with ``transB = 1`` (same product, N-D inputs), Gemm gets ``transB = 1``."""
    from onnx import helper

    nodes = []
    for node in model.graph.node:
        if len(node.input) > 1 and node.input[1] in names:
            if node.op_type == "MatMul":
                node = helper.make_node("FusedMatMul", list(node.input), list(node.output), name=node.name,
                                        domain="com.microsoft", transB=1)
            else:  # Gemm (checked by _reads_as_b)
                for a in node.attribute:
                    if a.name == "transB":
                        node.attribute.remove(a)
                        break
                node.attribute.append(helper.make_attribute("transB", 1))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _array(init: Any, engine: Path) -> np.ndarray:
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(init):
        init = type(init).FromString(init.SerializeToString())
        load_external_data_for_tensor(init, str(engine.parent))
    return numpy_helper.to_array(init)


def _external(init: Any) -> dict[str, Any] | None:
    """(file, offset, length) of an initializer kept in an external data file, or None when it is inline."""
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(init):
        return None
    info = {e.key: e.value for e in init.external_data}
    return {"file": info["location"], "offset": int(info.get("offset", 0)), "length": int(info["length"])}


def _encoding(inits: Mapping[str, Any], name: str) -> str:
    found = sorted(n for n in inits if n.startswith(name))
    return ", ".join(found[:3]) if found else "no initializer of that name (folded by the quantizer)"
