"""ONNX -> ONNX with LoRA kept as separate branches whose A and B are graph inputs.

For every LoRA target ``y = x @ W0ᵀ`` (a ``MatMul`` reading the initializer the name map found) the
graph gains ``y' = y + ((x @ Aᵀ) * mask) @ (s·B)ᵀ`` with inputs ``lora.{module}.A`` (in, R) and
``lora.{module}.B`` (R, out), and one shared ``lora.mask`` (rows, 1, R); ``R`` is a dynamic axis.
Feeding rank 0 gives the base model; feeding one task's matrices (mask of ones) gives that task,
unmerged, which is how ONNX Runtime's multi-LoRA API runs adapters; stacking several tasks with a
per-row mask serves a batch whose rows belong to different tasks (``edgelora.lora.feeds``).
Used as the unmerged alternative in ``edgelora bench`` and by the runtime for mixed batches.

API: ``add_lora_branches(model, locations) -> {module: (input_A, input_B)}`` (edits ``model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgelora.lora import MASK_INPUT, lora_input_names, stacked_feeds

from .names import NameMapError, WeightLocation

_ROWS, _RANK, _MINUS_ONE = "lora.const.rows_axis", "lora.const.rank_axis", "lora.const.minus_one"
_VIEW = "lora.view_shape"


def add_lora_branches(model: Any, locations: Mapping[str, WeightLocation]) -> dict[str, tuple[str, str]]:
    from onnx import TensorProto, helper

    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranks = _ranks(model)
    graph.input.append(helper.make_tensor_value_info(MASK_INPUT, TensorProto.FLOAT, ["mask_rows", 1, "rank"]))

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
        graph.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [in_dim, "rank"]))
        graph.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, ["rank", out_dim]))
        x, y = mm.input[0], mm.output[0]
        base_out = f"{y}/lora_base"
        n = f"{y}/lora"
        mm.output[0] = base_out
        xa = helper.make_node("MatMul", [x, a_name], [f"{n}_xa"], name=f"{mm.name}/lora_A")
        if mm.op_type == "MatMul" and ranks.get(x) == 3:
            # x is (batch, seq, in): the (rows, 1, R) mask broadcasts over x @ A (batch, seq, R) as it is
            masked = [helper.make_node("Mul", [f"{n}_xa", MASK_INPUT], [f"{n}_masked"], name=f"{mm.name}/lora_mask")]
        else:
            # x may be (batch·seq, in) (under a Gemm, or of unknown rank): view x @ A as (mask rows, -1, R)
            # so the per-row mask broadcasts, then back to its own shape
            masked = [
                helper.make_node("Shape", [f"{n}_xa"], [f"{n}_xa_shape"], name=f"{mm.name}/lora_shape"),
                helper.make_node("Reshape", [f"{n}_xa", _view_shape(graph)], [f"{n}_xa3"], name=f"{mm.name}/lora_view"),
                helper.make_node("Mul", [f"{n}_xa3", MASK_INPUT], [f"{n}_masked3"], name=f"{mm.name}/lora_mask"),
                helper.make_node("Reshape", [f"{n}_masked3", f"{n}_xa_shape"], [f"{n}_masked"],
                                 name=f"{mm.name}/lora_unview"),
            ]
        new_nodes[base_out] = [
            xa, *masked,
            helper.make_node("MatMul", [f"{n}_masked", b_name], [f"{n}_xab"], name=f"{mm.name}/lora_B"),
            helper.make_node("Add", [base_out, f"{n}_xab"], [y], name=f"{mm.name}/lora_add"),
        ]
        inputs[module] = (a_name, b_name)
    ordered = [n for n in graph.node if n.name.startswith("lora/")]  # the shared view shape (mask input only)
    for node in graph.node:  # keep the node list topologically sorted
        if node.name.startswith("lora/"):
            continue
        ordered.append(node)
        for out in node.output:
            ordered.extend(new_nodes.get(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return inputs


def _view_shape(graph: Any) -> str:
    """The (mask rows, -1, R) shape, computed once from the mask for every branch that needs it."""
    from onnx import TensorProto, helper

    if not any(n.name == "lora/lora_view_shape" for n in graph.node):
        for name, value in ((_ROWS, 0), (_RANK, 2), (_MINUS_ONE, -1)):
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
        graph.node.extend([
            helper.make_node("Shape", [MASK_INPUT], ["lora.mask_shape"], name="lora/lora_mask_shape"),
            helper.make_node("Gather", ["lora.mask_shape", _ROWS], ["lora.rows"], axis=0, name="lora/lora_rows"),
            helper.make_node("Gather", ["lora.mask_shape", _RANK], ["lora.rank"], axis=0, name="lora/lora_rank"),
            helper.make_node("Concat", ["lora.rows", _MINUS_ONE, "lora.rank"], [_VIEW], axis=0,
                             name="lora/lora_view_shape"),
        ])
    return _VIEW


def _ranks(model: Any) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can tell (weights left out: only their dims matter)."""
    import onnx

    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    graph = skeleton.graph  # the graph without the weights' bytes: shape inference needs their dims only
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.initializer.extend(onnx.TensorProto(name=i.name, dims=i.dims, data_type=i.data_type)
                             for i in model.graph.initializer)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except Exception:  # an op ONNX cannot type (com.microsoft): every branch takes the general path
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.value_info, *inferred.input)
            if v.type.tensor_type.HasField("shape")}


def remove_lora_branches(model: Any) -> None:
    """Undo :func:`add_lora_branches` on a (loaded) graph: the plain unfused base again, its weights untouched."""
    graph = model.graph
    keep = [n for n in graph.node if "/lora_" not in n.name]
    rename = {o: o[: -len("/lora_base")] for n in keep for o in n.output if o.endswith("/lora_base")}
    for node in keep:
        for i, o in enumerate(node.output):
            node.output[i] = rename.get(o, o)
    del graph.node[:]
    graph.node.extend(keep)
    inputs = [i for i in graph.input if not i.name.startswith("lora.")]
    del graph.input[:]
    graph.input.extend(inputs)
    inits = [i for i in graph.initializer if not i.name.startswith("lora.")]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def add_lora_defaults(model: Any) -> None:
    """Give every LoRA input a default (rank 1, zeros: the base model), making them overridable initializers,
    which is what ONNX Runtime's multi-LoRA API expects: an adapter file or a feed replaces them. Call it
    after quantizing: a quantizer would take the defaults for constant weights and fold them away."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    for value in graph.input:
        name = value.name
        if not name.startswith("lora."):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        fill = np.ones if name == MASK_INPUT else np.zeros
        graph.initializer.append(numpy_helper.from_array(fill(dims, np.float32), name))


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
    """Feeds for one task (rank 0 where the task has no delta for a module)."""
    return stacked_feeds([module_deltas], {m: in_out(locations[m]) for m in inputs})


def zero_rank_feeds(inputs: Mapping[str, tuple[str, str]], locations: Mapping[str, WeightLocation]
                    ) -> dict[str, Any]:
    """Feeds that make the branch graph compute the base model (rank 0 everywhere)."""
    return stacked_feeds([], {m: in_out(locations[m]) for m in inputs})
