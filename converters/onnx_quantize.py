"""ONNX fp32 -> quantized or cast ONNX, with ``onnxruntime.quantization`` (never by hand).

- int8: dynamic quantization (weights int8 per channel, activations quantized at run time).
- int4: weight-only blockwise ``MatMulNBits``; embeddings too (``GatherBlockQuantized``) where
  the target asks, so the largest tensor of a decoder shrinks as well; MatMuls named in
  ``eight_bit_nodes`` (attention projections in ``cpu-int4``) get 8-bit ``MatMulNBits`` instead.
- fp16: ``onnxconverter_common``-free cast via ONNX Runtime's ``float16`` converter (keeps I/O fp32).

API: ``quantize(src, dst, target) -> None``. Always called on a graph that already holds the merged
fp32 weights: merge first, quantize after.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


def quantize(src: Path, dst: Path, target: Any, exclude: tuple[str, ...] = ()) -> None:
    """``exclude``: node names left in float (a classification head: tiny, and the runtime applies it in fp32)."""
    import warnings

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


def _int4(src: Path, dst: Path, q: Any, exclude: tuple[str, ...] = ()) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    ops = ("MatMul", "Gather") if q.quantize_embeddings else ("MatMul",)
    eight = [n.name for n in model.graph.node
             if n.op_type == "MatMul" and any(pattern in n.name for pattern in q.eight_bit_nodes)]
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=q.block_size, is_symmetric=q.symmetric,
                                 accuracy_level=q.accuracy_level, op_types_to_quantize=ops,
                                 nodes_to_exclude=[*eight, *exclude],
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
    quant.process()
    if eight:  # the sensitive MatMuls (attention projections by default) at 8 bits, same kernel family
        quant = MatMulNBitsQuantizer(quant.model.model, bits=8, block_size=q.block_size, is_symmetric=q.symmetric,
                                     accuracy_level=q.accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_include=eight, quant_axes=(("MatMul", 0),))
        quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
