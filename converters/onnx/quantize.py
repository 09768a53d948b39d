"""ONNX fp32 -> quantized or cast ONNX, with ``onnxruntime.quantization`` (never by hand).

- int8: dynamic quantization (weights int8 per channel, activations quantized at run time); or static,
  calibrated QDQ (``calibrate.py``: int8 activations too, what phone NPUs run).
- int4: weight-only blockwise ``MatMulNBits``; embeddings too (``GatherBlockQuantized``) where
  the target asks, so the largest tensor of a decoder shrinks as well; MatMuls named in
  ``eight_bit_nodes`` (in ``cpu-int4``: attention, MLP down projection, LM head) get 8-bit
  ``MatMulNBits`` instead. Tied embeddings (the LM head's weight is the embedding table) are stored
  once: the embedding Gather reads the head's quantized blocks.
- fp16: ``onnxconverter_common``-free cast via ONNX Runtime's ``float16`` converter (keeps I/O fp32).

API: ``quantize(src, dst, target) -> None``. Always called on a graph that already holds the merged
fp32 weights: merge first, quantize after.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


def quantize(src: Path, dst: Path, target: Any, exclude: tuple[str, ...] = (), calibration: Any = None
             ) -> dict[str, Any] | None:
    """``exclude``: node names left in float (a classification head: tiny, and the runtime applies it in fp32).
    ``calibration``: a ``calibrate.CalibrationSet`` (static int8 only). Returns static int8's report, else None."""
    import warnings

    if target.precision == "int8" and target.quantization.method == "static":
        from .calibrate import quantize_static

        return quantize_static(src, dst, target.quantization, exclude, calibration)

    logging.disable(logging.WARNING)  # the quantizers log per-node notes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy divide warnings on all-zero blocks
            if target.precision == "int8":
                _int8(src, dst, target.quantization, exclude)
            elif target.precision == "int4":
                _int4(src, dst, target.quantization, exclude)
            elif target.precision == "fp16":
                _fp16(src, dst)
            else:
                raise ValueError(f"precision {target.precision!r} is not a quantization")
    finally:
        logging.disable(logging.NOTSET)
    return None


def head_nodes(src: Path) -> tuple[str, ...]:
    """The node(s) computing a sequence classifier's ``logits`` output (Gemm/MatMul, and its bias Add)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if [o.name for o in model.graph.output] != ["logits"]:
        return ()
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get("logits")
    names = []
    while node is not None and node.op_type in ("Gemm", "MatMul", "Add") and len(names) < 4:
        names.append(node.name)
        if node.op_type == "Gemm":  # the int8 quantizer first splits a Gemm into "{name}_MatMul" + "{name}_Add"
            names += [f"{node.name}_MatMul", f"{node.name}_Add"]
        if node.op_type != "Add":
            break
        node = next((producer[i] for i in node.input if i in producer), None)
    return tuple(names)


def _int8(src: Path, dst: Path, q: Any, exclude: tuple[str, ...] = ()) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=q.per_channel, reduce_range=q.reduce_range,
                     weight_type=QuantType.QInt8 if q.weight_type == "qint8" else QuantType.QUInt8,
                     # fused graphs hold com.microsoft ops that ONNX shape inference cannot type: they are float
                     nodes_to_exclude=list(exclude),
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
    if q.pair_safe:
        reencode_pair_safe(src, dst)


# integer MatMuls whose B (input 1) is an int8 weight multiplied by uint8 activations in ONNX Runtime's kernels
INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention")


def reencode_pair_safe(src: Path, dst: Path) -> int:
    """Re-encode, in ``dst``, every int8 weight an integer MatMul multiplies with uint8 activations (directly, or
    through a DequantizeLinear feeding a MatMul/Gemm, which ONNX Runtime fuses into one at load) in
    ``edgelora.lora.quant``'s ``int8-pairsafe`` recipe, from its fp32 original in ``src``: the quantizer's own
    names (``{w}_quantized``, ``{w}_scale``), symmetric per output column of a (K, N) weight. Weights in another
    layout (a transposed Gemm, per-tensor scales) are left as the quantizer wrote them. Returns how many were
    re-encoded; then checks that every integer weight left in ``dst`` is pair-safe, naming any that is not."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgelora.errors import EdgeloraError
    from edgelora.lora import PAIR_LIMIT, int8_per_column, max_pair_sum

    model = onnx.load(str(dst))
    inits = {i.name: i for i in model.graph.initializer}
    weights = integer_weights(model)
    originals = {i.name: i for i in onnx.load(str(src)).graph.initializer}
    done = 0
    for name in weights:
        base = name.removesuffix("_quantized")
        scale = inits.get(f"{base}_scale")
        if name == base or scale is None:
            continue
        if base in originals:
            w = numpy_helper.to_array(originals[base])
        elif base.endswith("_Transposed") and base.removesuffix("_Transposed") in originals:  # a Gemm's transB
            w = numpy_helper.to_array(originals[base.removesuffix("_Transposed")]).T
        else:  # no fp32 original by the quantizer's names: from the values it wrote
            w = numpy_helper.to_array(inits[name]).astype(np.float32) * numpy_helper.to_array(scale)
        if w.dtype != np.float32 or w.ndim != 2 or tuple(scale.dims) != (w.shape[1],):
            continue
        q, s = int8_per_column(w, "int8-pairsafe")
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        scale.CopyFrom(numpy_helper.from_array(s, scale.name))
        done += 1
    unsafe = [n for n in weights if max_pair_sum(numpy_helper.to_array(inits[n])) > PAIR_LIMIT]
    if unsafe:
        raise EdgeloraError(f"int8 weight {unsafe[0]} (and {len(unsafe) - 1} more) could not be made pair-safe: "
                            "it would saturate on AVX2 CPUs without VNNI; set [quantization] pair_safe = false "
                            "in the target to keep it as the quantizer wrote it")
    onnx.save(model, str(dst))
    return done


def integer_weights(model: Any) -> list[str]:
    """The int8 initializers multiplied with uint8 activations by an integer kernel: the B of an integer MatMul,
    or a DequantizeLinear's input feeding a MatMul/Gemm as B (a QDQ pair ONNX Runtime fuses at load)."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))

    def quantized(name: str) -> bool:
        return getattr(producer.get(name), "op_type", None) == "DequantizeLinear"

    out = []
    for node in model.graph.node:
        if node.op_type in INTEGER_MATMULS:
            name = node.input[1]
        elif node.op_type == "DequantizeLinear" and any(  # a weight-only DQ (float activations) runs in float
                c.op_type in ("MatMul", "Gemm") and k == 1 and quantized(c.input[0])
                for c, k in consumers.get(node.output[0], [])):
            name = node.input[0]
        else:
            continue
        if name in inits and inits[name].data_type == TensorProto.INT8 and name not in out:
            out.append(name)
    return out


def _int4(src: Path, dst: Path, q: Any, exclude: tuple[str, ...] = ()) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    tied = tied_embedding(model) if q.tie_embeddings and q.quantize_embeddings else None
    ops = ("MatMul", "Gather") if q.quantize_embeddings else ("MatMul",)
    eight = [n.name for n in model.graph.node
             if n.op_type == "MatMul" and any(pattern in n.name for pattern in q.eight_bit_nodes)]
    later = [tied[0]] if tied else []  # the tied embedding is rewired to the head's quantized tensor below
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=q.block_size, is_symmetric=q.symmetric,
                                 accuracy_level=q.accuracy_level, op_types_to_quantize=ops,
                                 nodes_to_exclude=[*eight, *exclude, *later],
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
    quant.process()
    model = quant.model.model
    # the sensitive MatMuls at 8 bits, same kernel family, each in the largest block up to
    # eight_bit_block_size that divides its rows (8 bits lose nothing measurable to larger blocks)
    for block, names in _eight_bit_blocks(model, eight, q.eight_bit_block_size or q.block_size).items():
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
        quant = MatMulNBitsQuantizer(model, bits=8, block_size=block, is_symmetric=True,
                                     accuracy_level=q.accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=others, quant_axes=(("MatMul", 0),))
        quant.process()
        model = quant.model.model
    if tied and not _share_head_weights(model, *tied):  # the head kept float or has zero points: a copy
        quant = MatMulNBitsQuantizer(model, bits=4, block_size=q.block_size, is_symmetric=q.symmetric,
                                     accuracy_level=q.accuracy_level, op_types_to_quantize=("Gather",),
                                     quant_axes=(("Gather", 1),))
        quant.process()
        model = quant.model.model
    onnx.save(model, str(dst))


def _eight_bit_blocks(model: Any, names: list[str], largest: int) -> dict[int, list[str]]:
    """block size -> MatMul names: the largest power of two ≤ ``largest`` (and ≥ 16) dividing the
    weight's rows K, so no block is padded; ``largest`` where none does."""
    from edgelora.target import BLOCK_SIZES

    inits = {i.name: i for i in model.graph.initializer}
    out: dict[int, list[str]] = {}
    for node in model.graph.node:
        if node.name in names and node.input[1] in inits:
            k = inits[node.input[1]].dims[0]
            block = next((b for b in sorted(BLOCK_SIZES, reverse=True) if b <= largest and k % b == 0), largest)
            out.setdefault(block, []).append(node.name)
    return out


def tied_embedding(model: Any) -> tuple[str, str] | None:
    """(embedding Gather, LM-head MatMul) node names when the head's weight is the embedding table
    transposed, value for value (tied embeddings exported as two copies), else None."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    tables = {n.input[0]: n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        h, v = inits[node.input[1]].dims
        for name, gather in tables.items():
            if list(inits[name].dims) == [v, h] and np.array_equal(numpy_helper.to_array(inits[name]).T,
                                                                   numpy_helper.to_array(inits[node.input[1]])):
                return gather.name, node.name
    return None


def _share_head_weights(model: Any, gather_name: str, head_name: str) -> bool:
    """Make the embedding Gather read the quantized LM head's blocks (``GatherBlockQuantized``, MatMulNBits'
    layout): the table is stored once. Only the small scales are copied, in the shape the Gather takes.
    False (nothing changed) when the head is not a symmetric MatMulNBits."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    quantized = {f"{head_name}_Q4", f"{head_name}_Q8"}  # how MatMulNBitsQuantizer names the node it writes
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.name in quantized), None)
    if head is None or (len(head.input) > 3 and head.input[3]):
        return False
    gather = nodes[gather_name]
    inits = {i.name: i for i in graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    hidden, block, bits = attrs["K"], attrs["block_size"], attrs["bits"]
    blocks = -(-hidden // block)
    vocab = inits[head.input[1]].dims[0]
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, blocks, 1)
    out = gather.output[0]
    extra = [numpy_helper.from_array(scales, f"{head.input[2]}_gather"),
             numpy_helper.from_array(np.array([0, 0, blocks * block], np.int64), f"{out}_shape")]
    new = [helper.make_node("GatherBlockQuantized", [head.input[1], gather.input[1], extra[0].name], [f"{out}_blocks"],
                            name=f"{gather.name}_quantized", domain="com.microsoft", gather_axis=0, quantize_axis=2,
                            block_size=block, bits=bits),
           helper.make_node("Reshape", [f"{out}_blocks", extra[1].name],
                            [out if blocks * block == hidden else f"{out}_padded"], name=f"{gather.name}_reshape")]
    if blocks * block != hidden:  # the last block is padded: cut the row back to the hidden size
        extra += [numpy_helper.from_array(np.array(v, np.int64), f"{out}_{k}")
                  for k, v in (("starts", [0]), ("ends", [hidden]), ("axes", [2]))]
        new.append(helper.make_node("Slice", [f"{out}_padded", f"{out}_starts", f"{out}_ends", f"{out}_axes"], [out],
                                    name=f"{gather.name}_slice"))
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, node in enumerate(new):
        graph.node.insert(at + k, node)
    if not any(gather.input[0] in n.input for n in graph.node):
        graph.initializer.remove(inits[gather.input[0]])
    graph.initializer.extend(extra)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
