"""ONNX -> ONNX with LoRA kept as separate branches whose A and B are graph inputs.

For every LoRA target ``y = x @ W0ᵀ`` (a ``MatMul`` reading the initializer the name map found) the
graph gains ``y' = y + (x @ Aᵀ) @ (s·B)ᵀ`` with two new inputs ``lora.{module}.A`` (in, r) and
``lora.{module}.B`` (r, out), the rank ``r`` a dynamic axis. Feeding rank 0 gives the base model;
feeding one task's matrices gives that task, unmerged, which is how ONNX Runtime's multi-LoRA API
runs adapters. Used as the unmerged alternative in ``edgelora bench`` and, in the runtime, for
batches that mix tasks.

API: ``add_lora_branches(model, locations) -> {module: (input_A, input_B)}`` (edits ``model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .onnx_names import NameMapError, WeightLocation


def lora_input_names(module: str) -> tuple[str, str]:
    return f"lora.{module}.A", f"lora.{module}.B"


def add_lora_branches(model: Any, locations: Mapping[str, WeightLocation]) -> dict[str, tuple[str, str]]:
    from onnx import TensorProto, helper

    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_nodes: dict[str, list[Any]] = {}  # output of the original MatMul -> nodes to insert after it
    inputs: dict[str, tuple[str, str]] = {}
    for module, loc in sorted(locations.items()):
        users = consumers.get(loc.initializer, [])
        if loc.slice is not None or len(users) != 1 or not _weight_side(users[0], loc):
            raise NameMapError(f"LoRA target {module!r}: its weight {loc.initializer!r} is not the weight of exactly "
                               "one MatMul/Gemm in this graph, so no LoRA branch can be attached (use the "
                               "unfused fp32 export)")
        mm = users[0]
        in_dim, out_dim = in_out(loc)
        a_name, b_name = lora_input_names(module)
        graph.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [in_dim, f"rank_{len(inputs)}"]))
        graph.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [f"rank_{len(inputs)}", out_dim]))
        x, y = mm.input[0], mm.output[0]
        base_out = f"{y}/lora_base"
        xa, xab = f"{y}/lora_xa", f"{y}/lora_xab"
        mm.output[0] = base_out
        new_nodes[base_out] = [
            helper.make_node("MatMul", [x, a_name], [xa], name=f"{mm.name}/lora_A"),
            helper.make_node("MatMul", [xa, b_name], [xab], name=f"{mm.name}/lora_B"),
            helper.make_node("Add", [base_out, xab], [y], name=f"{mm.name}/lora_add"),
        ]
        inputs[module] = (a_name, b_name)
    ordered = []
    for node in graph.node:  # keep the node list topologically sorted
        ordered.append(node)
        for out in node.output:
            ordered.extend(new_nodes.get(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return inputs


def in_out(loc: WeightLocation) -> tuple[int, int]:
    """(in, out) features of the layer whose weight ``loc`` holds (whole initializers only)."""
    return (loc.shape[0], loc.shape[1]) if loc.transposed else (loc.shape[1], loc.shape[0])


def _weight_side(node: Any, loc: WeightLocation) -> bool:
    """True when ``node`` computes x @ W0ᵀ with the initializer as its second input (MatMul, or Gemm
    without transA; Gemm's transB tells the layout, as GPT-2's Conv1D exports do)."""
    if len(node.input) < 2 or node.input[1] != loc.initializer or node.input[0] == loc.initializer:
        return False
    if node.op_type == "MatMul":
        return loc.transposed
    if node.op_type == "Gemm":
        ints = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        return alpha == 1.0 and not ints.get("transA", 0) and bool(ints.get("transB", 0)) != loc.transposed
    return False


def branch_feeds(module_deltas: Mapping[str, Any], inputs: Mapping[str, tuple[str, str]],
                 locations: Mapping[str, WeightLocation]) -> dict[str, Any]:
    """Feeds for one task: Aᵀ (in, r) and (s·B)ᵀ (r, out) per module; rank 0 where the task has none."""
    import numpy as np

    feeds: dict[str, Any] = {}
    for module, (a_name, b_name) in inputs.items():
        d = module_deltas.get(module)
        if d is None:
            in_dim, out_dim = in_out(locations[module])
            feeds[a_name] = np.zeros((in_dim, 0), np.float32)
            feeds[b_name] = np.zeros((0, out_dim), np.float32)
        else:
            feeds[a_name] = np.ascontiguousarray(d.A.T, dtype=np.float32)
            feeds[b_name] = np.ascontiguousarray((d.B * d.scale).T, dtype=np.float32)
    return feeds


def zero_rank_feeds(inputs: Mapping[str, tuple[str, str]], locations: Mapping[str, WeightLocation]
                    ) -> dict[str, Any]:
    """Feeds that make the branch graph compute the base model (rank 0 everywhere)."""
    return branch_feeds({}, inputs, locations)
