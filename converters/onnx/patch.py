"""Bake a task engine by patching the base engine: no re-trace, no re-optimization, no whole-model quantization.

A task engine is the base engine whose LoRA-target initializers hold ``W0 + s·B·A`` instead of ``W0``, plus
the task's head for encoders whose base engine is headless. The name map says where each module's W0 lives
in the fp32 graph the base engine was made from; ``encodings`` says how the target stores that initializer
in the final engine — float32, float16, ONNX Runtime's dynamic int8 (per column, symmetric) or its
``MatMulNBits`` blocks (4 or 8 bits) — and checks, once per export, that re-encoding the fp32 W0 gives the
engine's own bytes exactly. A patched weight is then merged in fp32 (``ΔW`` in the layout the runtime's swap
uses, so a swap rebuilds it bit for bit) and re-encoded by the same recipe, for the changed weights only:
the quantizer's own C++ kernels for the blocks (``quantize_matmul_{4,8}bits``, what ``MatMulNBitsQuantizer``
calls), ``edgelora.lora.int8_per_column`` for int8 (checked equal to ``quantize_dynamic``'s output).

Where this cannot apply (an encoding it cannot reproduce, DoRA, LoRA biases, LoRA on an embedding, heads
other than a linear classifier on the pooled output), :func:`task_patch_reason` says why and the exporter
re-exports the merged model instead.

API: ``encodings(model, fp32_weights) -> (encodings | None, reason)``;
``patch(model, encodings, fp32_weights, locations, modules, layouts, head) -> ModelProto``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.lora import INT8_LEVELS, LAYOUTS, DeltaModule, int8_per_column, int8_recipe

from .names import WeightLocation

HEAD_KEYS = {"classifier.weight", "classifier.bias"}


@dataclass(frozen=True)
class Encoding:
    """How the final engine stores one fp32 initializer: ``recipe`` and the initializers that hold it
    (weight first; int8: + scale; nbits: + scales [+ zero points])."""

    recipe: str  # float32 | float16 | int8 | int8-reduced | int8-pairsafe (edgelora.lora.quant) | nbits
    names: tuple[str, ...]
    bits: int = 0
    block_size: int = 0
    symmetric: bool = True


def encodings(model: Any, fp32_weights: Mapping[str, np.ndarray], folder: Path
              ) -> tuple[dict[str, Encoding] | None, str | None]:
    """The encoding of every initializer in ``fp32_weights`` in ``model`` (its external data in ``folder``), each
    checked to reproduce the engine's bytes from the fp32 W0; ``(None, reason)`` where one does not."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    nbits = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    found: dict[str, Encoding] = {}
    for name, w0 in fp32_weights.items():
        init = inits.get(name)
        if init is not None and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            enc = Encoding("float32" if init.data_type == TensorProto.FLOAT else "float16", (name,))
        elif f"{name}_quantized" in inits and f"{name}_scale" in inits:
            zp = inits.get(f"{name}_zero_point")
            if zp is not None and _array(zp, folder).any():
                return None, f"{name}: int8 with zero points (asymmetric) is not re-encoded here"
            stored, scale = (_array(inits[f"{name}_{k}"], folder) for k in ("quantized", "scale"))
            enc = Encoding(int8_recipe(w0, stored, scale) or "int8", (f"{name}_quantized", f"{name}_scale"))
        elif (q := next((f"{name}_Q{b}" for b in (4, 8) if f"{name}_Q{b}" in nbits), None)) is not None:
            node = nbits[q]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            symmetric = len(node.input) < 4 or not node.input[3]
            names = (q, node.input[2], *(() if symmetric else (node.input[3],)))
            enc = Encoding("nbits", names, int(attrs["bits"]), int(attrs["block_size"]), symmetric)
        else:
            return None, f"{name}: stored in a form the patcher does not re-encode"
        if any(n not in inits for n in enc.names):
            return None, f"{name}: its encoded initializers are not all in the engine"
        try:
            same = all(np.array_equal(a.reshape(-1).view(np.uint8), _array(inits[n], folder).reshape(-1).view(np.uint8))
                       for a, n in zip(encode(enc, w0), enc.names, strict=True))
        except ValueError:
            same = False
        if not same:
            return None, f"{name}: re-encoding its fp32 W0 ({enc.recipe}) does not reproduce the engine's bytes"
        found[name] = enc
    return found, None


def encode(enc: Encoding, w: np.ndarray) -> list[np.ndarray]:
    """``w`` (the fp32 initializer, in the fp32 graph's layout) in ``enc``'s recipe, one array per name."""
    if enc.recipe == "float32":
        return [np.ascontiguousarray(w, np.float32)]
    if enc.recipe == "float16":
        return [w.astype(np.float16)]
    if enc.recipe in INT8_LEVELS:
        q, scale = int8_per_column(w, enc.recipe)
        return [q, scale]
    return list(_nbits(enc, w))


def _nbits(enc: Encoding, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """MatMulNBits blocks of a (K, N) weight by ONNX Runtime's own kernel (``DefaultWeightOnlyQuantizer``'s
    ``qbits_block_quant``, QOperator format): packed (N, blocks, blob), scales (N, blocks)[, zero points]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = w.shape
    block, kpack = enc.block_size, 8 // enc.bits
    k_blocks = (rows + block - 1) // block
    if k_blocks * block > rows:
        w = np.pad(w, ((0, k_blocks * block - rows), (0, 0)))
    w = np.ascontiguousarray(w, np.float32)
    packed = np.zeros((cols, k_blocks, (block + kpack - 1) // kpack), np.uint8)
    zero = np.zeros((cols, (k_blocks + kpack - 1) // kpack), np.uint8)
    scales = np.zeros((cols, k_blocks), np.float32)
    kernel = quantize_matmul_8bits if enc.bits == 8 else quantize_matmul_4bits
    kernel(packed, w, scales, zero, block, cols, rows, enc.symmetric)
    return (packed, scales) if enc.symmetric else (packed, scales, zero)


def task_patch_reason(lora_kinds: Mapping[str, str], dora: bool, bias: bool, head: Mapping[str, np.ndarray],
                      headless: bool) -> str | None:
    """Why a task cannot be baked by patching (None: it can). ``lora_kinds``: module -> "linear"/"embedding"."""
    if dora:
        return "DoRA rescales the merged weight per channel"
    if bias:
        return "a LoRA bias changes a bias, which the name map does not locate"
    if any(kind != "linear" for kind in lora_kinds.values()):
        return "LoRA on an embedding (its table may be shared with the output head)"
    extra = sorted(set(head) - (HEAD_KEYS if headless else set()))
    if extra:
        return f"the adapter replaces {extra[0]} (modules_to_save beyond a linear classifier on the pooled output)"
    return None


def patch(model: Any, encs: Mapping[str, Encoding], fp32_weights: Mapping[str, np.ndarray],
          locations: Mapping[str, WeightLocation], modules: Mapping[str, DeltaModule], layouts: Mapping[str, str],
          head: Mapping[str, np.ndarray] | None, pooling: str = "cls") -> Any:
    """A copy of ``model`` with every initializer the task touches re-encoded from ``W0 + s·B·A`` (fp32, ΔW in
    the module's layout), stored inline, and, for a headless encoder, the classifier on ``pooler_output`` (or,
    with ``pooling="mean"``, on the masked mean of ``last_hidden_state``) as the ``logits``. Initializers it
    does not touch keep their references into the base engine's data file."""
    import onnx

    task = onnx.ModelProto()
    task.CopyFrom(model)
    inits = {i.name: i for i in task.graph.initializer}
    touched: dict[str, list[str]] = {}
    for module in sorted(modules):
        touched.setdefault(locations[module].initializer, []).append(module)
    for name, mods in touched.items():
        w = np.array(fp32_weights[name], np.float32, copy=True)
        for module in mods:
            d, loc, layout = modules[module], locations[module], layouts.get(module, "in_out")
            dw = LAYOUTS[layout](d.A, d.B, d.scale)
            loc.write(w, loc.read(w) + (dw.T if layout == "in_out" else dw))  # (out, in), added as torch adds
        for init_name, array in zip(encs[name].names, encode(encs[name], w), strict=True):
            _replace(inits[init_name], array)
    if head:
        _add_classifier(task, head, pooling)
    return task


def _replace(init: Any, array: np.ndarray) -> None:
    from onnx import numpy_helper

    new = numpy_helper.from_array(array.reshape(tuple(init.dims)), init.name)
    if new.data_type != init.data_type:
        raise ValueError(f"{init.name}: re-encoded as type {new.data_type}, the engine stores {init.data_type}")
    init.CopyFrom(new)


def _add_classifier(model: Any, head: Mapping[str, np.ndarray], pooling: str = "cls") -> None:
    """``logits = pooled @ Wᵀ + b`` (dropout off), the only output. ``pooled`` is ``pooler_output``
    (BertForSequenceClassification's head) or, with ``pooling="mean"``, the masked mean of ``last_hidden_state``
    (``edgelora.modeling_edgelora``): ``Σ_t mask·h / max(Σ_t mask, 1)``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    w = np.asarray(head["classifier.weight"], np.float32)
    pooled = "pooler_output" if pooling == "cls" else _add_mean_pool(graph)
    inputs = [pooled, "classifier.weight"]
    graph.initializer.append(numpy_helper.from_array(w, "classifier.weight"))
    if "classifier.bias" in head:
        graph.initializer.append(numpy_helper.from_array(np.asarray(head["classifier.bias"], np.float32),
                                                         "classifier.bias"))
        inputs.append("classifier.bias")
    graph.node.append(helper.make_node("Gemm", inputs, ["logits"], name="/classifier/Gemm", transB=1))
    batch = next((o.type.tensor_type.shape.dim[0] for o in graph.output if o.name == "last_hidden_state"), None)
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch.dim_param or batch.dim_value
                                                                      if batch is not None else "batch", w.shape[0]])
    del graph.output[:]
    graph.output.append(out)


def _add_mean_pool(graph: Any) -> str:
    """Nodes computing the masked mean of ``last_hidden_state`` over the sequence; returns its name."""
    from onnx import TensorProto, helper, numpy_helper

    p = "/mean_pool/"
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), p + "seq_axis"),
                              numpy_helper.from_array(np.array([-1], np.int64), p + "last_axis"),
                              numpy_helper.from_array(np.array(1.0, np.float32), p + "one")])
    graph.node.extend([
        helper.make_node("Cast", ["attention_mask"], [p + "mask"], name=p + "Cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask", p + "last_axis"], [p + "mask3"], name=p + "Unsqueeze"),
        helper.make_node("Mul", ["last_hidden_state", p + "mask3"], [p + "masked"], name=p + "Mul"),
        helper.make_node("ReduceSum", [p + "masked", p + "seq_axis"], [p + "sum"], name=p + "ReduceSum", keepdims=0),
        helper.make_node("ReduceSum", [p + "mask3", p + "seq_axis"], [p + "count"], name=p + "Count", keepdims=0),
        helper.make_node("Max", [p + "count", p + "one"], [p + "count1"], name=p + "Max"),
        helper.make_node("Div", [p + "sum", p + "count1"], [p + "pooled"], name=p + "Div"),
    ])
    return p + "pooled"


def _array(init: Any, folder: Path) -> np.ndarray:
    """An initializer's values, its external data read from ``folder`` (the proto keeps its reference)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(init):
        init = type(init).FromString(init.SerializeToString())
        load_external_data_for_tensor(init, str(folder))
    return numpy_helper.to_array(init)
