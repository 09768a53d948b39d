"""How fast can int8 be on this CPU? W1's GEMMs alone, fp32 vs ONNX Runtime dynamic int8, side by side.

    python benchmarks/int8_gemm_bound.py [--json out.json] [--rounds 20]

Each of W1's four GEMM shapes (128 tokens: q/k/v packed, attention output, FFN in, FFN out) as a
one-MatMul graph in fp32 and after ``quantize_dynamic`` (per-channel int8 weights, activations
quantized at run time: ``DynamicQuantizeMatMul``, the op the cpu-int8 engines run), 2 threads,
interleaved blocks of runs, medians. The ratio is the most a whole int8 engine can gain over fp32
when every op is a GEMM; attention, LayerNorm and GELU stay fp32 and only dilute it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"qkv": (128, 384, 1152), "attention out": (128, 384, 384), "ffn in": (128, 384, 1536),
          "ffn out": (128, 1536, 384)}


def _graphs(folder: Path, m: int, k: int, n: int) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "W")])
    fp32, int8 = folder / f"{m}x{k}x{n}.fp32.onnx", folder / f"{m}x{k}x{n}.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    logging.disable(logging.WARNING)
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    logging.disable(logging.NOTSET)
    return fp32, int8


def measure(rounds: int = 20, per_round: int = 20, threads: int = 2) -> dict:
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # several sessions alive
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    out = {}
    with tempfile.TemporaryDirectory(prefix="edgelora-gemm-") as tmp:
        for name, (m, k, n) in SHAPES.items():
            sessions = dict(zip(("fp32", "int8"), map(session, _graphs(Path(tmp), m, k, n)), strict=True))
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            times: dict[str, list[float]] = {p: [] for p in sessions}
            for _ in range(rounds):
                for p, s in sessions.items():
                    s.run(None, {"x": x})
                    for _ in range(per_round):
                        t = time.perf_counter()
                        s.run(None, {"x": x})
                        times[p].append(time.perf_counter() - t)
            med = {p: float(np.median(v)) for p, v in times.items()}
            out[name] = {"shape": [m, k, n], "fp32_ms": med["fp32"] * 1e3, "int8_ms": med["int8"] * 1e3,
                         "fp32_gmac_s": m * k * n / med["fp32"] / 1e9, "int8_gmac_s": m * k * n / med["int8"] / 1e9,
                         "speedup": med["fp32"] / med["int8"]}
    total = {p: sum(v[f"{p}_ms"] * 6 for v in out.values()) for p in ("fp32", "int8")}  # 6 layers
    out["all W1 GEMMs (6 layers)"] = {"fp32_ms": total["fp32"], "int8_ms": total["int8"],
                                      "speedup": total["fp32"] / total["int8"]}
    return out


def table(result: dict) -> str:
    lines = ["W1 GEMMs alone, 2 threads, fp32 MatMul vs dynamic int8 (DynamicQuantizeMatMul), medians",
             f"  {'GEMM':26s} {'M x K x N':>16s} {'fp32':>9s} {'int8':>9s} {'int8 speed-up':>14s}"]
    for name, r in result.items():
        shape = " x ".join(map(str, r["shape"])) if "shape" in r else "-"
        lines.append(f"  {name:26s} {shape:>16s} {r['fp32_ms']:7.3f}ms {r['int8_ms']:7.3f}ms {r['speedup']:13.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    result = measure(args.rounds)
    print(table(result))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
