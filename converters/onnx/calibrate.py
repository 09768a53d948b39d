"""Calibrated static int8 (QDQ): the format phone NPUs (NNAPI, CoreML, QNN) and ONNX Runtime's CPU kernels run
with int8 activations, calibrated on real inputs, and a sensitivity pass that keeps the few MatMuls carrying most
of the error in float.

How (measured on W1, SST-2 example adapter, 6,735 dev phrases and the 851 of at least 20 words; see
``benchmarks/int8_accuracy.py``):

- **What is quantized**: every MatMul/Gemm with a constant weight (per-channel symmetric int8 weights, uint8
  activations per tensor) and the embedding Gathers. MatMuls of two activations (attention scores, attention
  times values) stay float: quantizing them too cost 1.1 points more. Quantizing every op (Softmax, Add, norms)
  cost 17 points.
- **Calibrator**: ONNX Runtime's MinMax, Entropy and Percentile measured alike or MinMax best (drop 0.73, 0.73,
  0.82 points before the sensitivity pass); MinMax is the default (seconds, where the histogram ones take
  15 s on W1). The calibration batches are padded to the target's sequence length: the histogram
  calibrators need one shape.
- **Sensitivity pass**: each quantized MatMul's own error is measured alone, in numpy — its fp32 input, quantized
  with the scale and zero point the calibrator chose, times its per-channel int8 weight, against the fp32
  product — and the MatMuls are kept out of activation quantization in that order, one more per trial (their
  weights still per-channel int8, ``weight_only``; ``kept_nodes = "float"`` keeps them fully float), until every
  check (each task's decisions on held-out texts against the fp32 engine) agrees to ``sensitivity_agreement``.
  On W1 the feed-forward output projections (their input is GELU's long-tailed output, which a per-tensor uint8
  scale spends on a few outliers) rank first, and three of them are kept.

API: ``quantize_static(src, dst, q, exclude, calibration) -> report``; ``calibration`` is a
:class:`CalibrationSet` the exporter builds from ``--calibrate`` texts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.lora import DeltaModule, int8_per_column

from .quantize import reencode_pair_safe


@dataclass(frozen=True)
class Check:
    """One task's held-out texts (as engine feeds), its LoRA modules and its classifier head: the pass patches both
    engines with the task (fp32: W0 + s·B·A; int8: the same, re-quantized per channel, as its baked engine will
    be) and compares their decisions."""

    name: str
    feeds: Sequence[Mapping[str, np.ndarray]]
    modules: Mapping[str, DeltaModule]
    head: Mapping[str, np.ndarray]
    pooling: str = "cls"  # what the head reads (edgelora.base.HeadSpec)


@dataclass(frozen=True)
class CalibrationSet:
    batches: Sequence[Mapping[str, np.ndarray]]  # what the calibrator runs
    checks: Sequence[Check] = field(default_factory=tuple)  # what the sensitivity pass holds to the bound
    w0: Mapping[str, np.ndarray] = field(default_factory=dict)  # LoRA module -> W0 (out, in), to find its weight


def quantize_static(src: Path, dst: Path, q: Any, exclude: Sequence[str], calibration: CalibrationSet
                    ) -> dict[str, Any]:
    """``src`` (fp32, unfused) -> ``dst`` (QDQ int8). Returns the report: calibrator, per-node errors, the nodes kept
    float and each trial's agreement."""
    import onnx

    if not calibration.batches:
        raise EdgeloraError("static int8 needs calibration texts; pass --calibrate NAME=FILE")
    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    weighted = [n.name for n in model.graph.node
                if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    activations = [n.name for n in model.graph.node
                   if n.op_type == "MatMul" and not (len(n.input) > 1 and n.input[1] in inits)]
    fixed = [*exclude, *activations,
             *(n for n in weighted if any(p in n for p in q.float_nodes))]
    candidates = [n for n in weighted if n not in fixed]
    t0 = time.perf_counter()
    cache = dst.with_name(dst.stem + ".ranges.json")  # the ranges are the fp32 model's: calibrate once
    cache.unlink(missing_ok=True)
    _quantize(src, dst, q, fixed, calibration.batches, cache)
    errors = _node_errors(src, dst, candidates, calibration.batches[:4], q.int8_recipe)
    ranked = sorted(candidates, key=lambda n: -errors[n])
    trials: list[dict[str, Any]] = []
    kept: list[str] = []
    limit = q.sensitivity_max_float if q.sensitivity else 0
    checks = _Checks(src, calibration)
    while True:
        agreement = checks.agreement(dst)
        trials.append({"float_nodes": len(kept), "agreement": agreement})
        if not calibration.checks or min(agreement.values()) >= q.sensitivity_agreement or len(kept) >= limit:
            break
        kept.append(ranked[len(kept)])
        _quantize(src, dst, q, [*fixed, *kept], calibration.batches, cache)
        if q.kept_nodes == "weight_only":
            weight_only(dst, kept)
    passed = not calibration.checks or min(trials[-1]["agreement"].values()) >= q.sensitivity_agreement
    return {"method": "static", "format": "QDQ", "calibration": q.calibration,
            "calibration_batches": len(calibration.batches), "activation_type": q.activation_type,
            "kept_float": kept, "kept_as": q.kept_nodes, "kept_float_by_rule": sorted(set(fixed) - set(exclude)),
            "node_errors": {n: round(errors[n], 6) for n in ranked},
            "sensitivity_agreement": q.sensitivity_agreement, "trials": trials, "passed": passed,
            "seconds": round(time.perf_counter() - t0, 1)}


def weight_only(path: Path, nodes: Sequence[str]) -> None:
    """Give the MatMuls ``nodes`` (left float by the quantizer) per-channel int8 weights behind a DequantizeLinear,
    their activations staying float: the sensitivity pass's error came from their inputs' 8-bit steps (W1: GELU's
    long tail), while a per-channel int8 weight costs them nothing measurable and a quarter of the bytes (full
    range: the MatMul runs in float after the DequantizeLinear, no integer kernel can saturate). Same
    encoding and names as the quantizer's (``{w}_quantized``, ``_scale``, ``_zero_point``), so a LoRA target among
    them is still patched and swapped per task."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    added = []
    for node in graph.node:
        if node.name not in nodes or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        name = node.input[1]
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32 or w.ndim != 2:
            continue
        qw, scale = int8_per_column(w)
        out = f"{name}_DequantizeLinear_Output"
        graph.initializer.extend([numpy_helper.from_array(qw, f"{name}_quantized"),
                                  numpy_helper.from_array(scale, f"{name}_scale"),
                                  numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point")])
        added.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                      [out], name=f"{name}_DequantizeLinear", axis=1))
        node.input[1] = out
    used = {i for n in graph.node for i in n.input}
    for name in [n for n in inits if n not in used]:
        graph.initializer.remove(inits[name])
    for k, node in enumerate(added):
        graph.node.insert(k, node)
    onnx.save(model, str(path))


def _quantize(src: Path, dst: Path, q: Any, exclude: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]],
              cache: Path) -> None:
    import warnings

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    ops = ["MatMul", "Gemm", *(["Gather"] if q.quantize_embeddings else [])]
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort_quantize_static(str(src), str(dst), _Reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=q.per_channel, reduce_range=q.reduce_range,
                                activation_type=types[q.activation_type],
                                weight_type=types[q.weight_type], calibrate_method=methods[q.calibration],
                                op_types_to_quantize=ops, nodes_to_exclude=list(exclude),
                                calibration_cache_path=str(cache),
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    finally:
        logging.disable(logging.NOTSET)
    if q.pair_safe:
        reencode_pair_safe(src, dst)


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over prepared feeds (restartable)."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return dict(nxt) if nxt is not None else None

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (dict(b) for b in self.batches)


def _session(path: Path, outputs: Sequence[str] = ()) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if outputs:  # intermediate tensors as outputs: ORT must not fuse them away
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


class _Checks:
    """The sensitivity pass's checks: the fp32 graph's name map and each task's fp32 decisions, made once; each
    trial then patches and runs only the quantized engine."""

    def __init__(self, src: Path, cal: CalibrationSet) -> None:
        import onnx

        from .names import build_name_map, float_initializers
        from .patch import encodings

        self.cal = cal
        self.reference: dict[str, list[np.ndarray]] = {}
        if not cal.checks:
            return
        fp32 = onnx.load(str(src))
        self.locations = build_name_map(fp32, cal.w0)
        wanted = {loc.initializer for loc in self.locations.values()}
        self.weights = {k: v for k, v in float_initializers(fp32).items() if k in wanted}
        enc, why = encodings(fp32, self.weights, src.parent)
        if enc is None:
            raise EdgeloraError(f"static int8: the fp32 weights cannot be patched per task ({why})")
        for check in cal.checks:
            self.reference[check.name] = self._decide(fp32, enc, check)

    def agreement(self, dst: Path) -> dict[str, float]:
        """Per check: the share of held-out rows where the quantized engine, patched with the task, decides as the
        fp32 engine patched with it does."""
        import onnx

        from .patch import encodings

        if not self.cal.checks:
            return {}
        qdq = onnx.load(str(dst))
        enc, why = encodings(qdq, self.weights, dst.parent)
        if enc is None:
            raise EdgeloraError(f"static int8: the quantized weights cannot be re-encoded per task ({why})")
        out: dict[str, float] = {}
        for check in self.cal.checks:
            got = self._decide(qdq, enc, check)
            same = sum(int((a == b).sum()) for a, b in zip(self.reference[check.name], got, strict=True))
            out[check.name] = round(same / max(sum(len(a) for a in got), 1), 4)
        return out

    def _decide(self, model: Any, enc: Any, check: Check) -> list[np.ndarray]:
        import onnxruntime as ort

        from .patch import patch

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(patch(model, enc, self.weights, self.locations, check.modules, {}, check.head,
                                          check.pooling)
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [sess.run(["logits"], _feeds(sess, feeds))[0].argmax(-1) for feeds in check.feeds]


def _node_errors(src: Path, qdq: Path, nodes: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]],
                 recipe: str = "int8") -> dict[str, float]:
    """Each MatMul's own quantization error, ``‖Q(x)·Q(W) − x·W‖ / ‖x·W‖`` on fp32 inputs ``x``: the activation
    quantized with the scale and zero point the calibrator gave its input in ``qdq``, the weight per-channel
    symmetric int8 in ``recipe`` (as the engine stores it)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    qmodel = onnx.load(str(qdq), load_external_data=False)
    qinits = {i.name: i for i in qmodel.graph.initializer}
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    params: dict[str, tuple[float, int, int, int] | None] = {}
    for name in nodes:
        qnode = next((n for n in qmodel.graph.node if n.name == name), None)
        dq = producers.get(qnode.input[0]) if qnode is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in qinits:
            params[name] = None  # the quantizer left this one float
            continue
        scale = float(numpy_helper.to_array(qinits[dq.input[1]]).reshape(-1)[0])
        zp_arr = numpy_helper.to_array(qinits[dq.input[2]]) if len(dq.input) > 2 else np.zeros(1, np.uint8)
        info = np.iinfo(zp_arr.dtype)
        params[name] = (scale, int(zp_arr.reshape(-1)[0]), int(info.min), int(info.max))
    wanted = sorted({by_name[n].input[0] for n in nodes})
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in existing)
    probe = src.with_name(src.stem + ".probe.onnx")
    onnx.save(model, str(probe))
    try:
        sess = _session(probe, wanted)
        names = [o.name for o in sess.get_outputs()]
        acts: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for feeds in batches:
            out = dict(zip(names, sess.run(None, _feeds(sess, feeds)), strict=True))
            for t in wanted:
                acts[t].append(out[t].reshape(-1, out[t].shape[-1]))
    finally:
        probe.unlink(missing_ok=True)
    errors: dict[str, float] = {}
    for name in nodes:
        node = by_name[name]
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        x = np.concatenate(acts[node.input[0]])
        ref = x @ w
        if params[name] is None:
            errors[name] = 0.0
            continue
        scale, zp, lo, hi = params[name]
        xq = (np.clip(np.rint(x / scale) + zp, lo, hi) - zp) * scale
        qw, sw = int8_per_column(w, recipe)
        errors[name] = float(np.linalg.norm(xq @ (qw.astype(np.float32) * sw) - ref) / max(np.linalg.norm(ref), 1e-12))
    return errors
