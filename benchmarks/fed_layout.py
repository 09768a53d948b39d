"""Fed weights at a decode step: (out, in), read transposed, vs (in, out), read as MatMul's B.

    python benchmarks/fed_layout.py [--folder DIR] [--rounds 40] [--json out.json]

The runtime's swap graph takes the LoRA-target weights as inputs, so ONNX Runtime cannot prepack them.
fp32 swap graphs feed them (out, in) to ``FusedMatMul``/``Gemm`` with ``transB`` (see
``converters/onnx/swap.py``). This compares, side by side in one process, on a W2 deployment
(``cpu-fp32``; ``--folder``, default the one ``benchmarks/runtime.py`` writes, exported here if missing):

- the task's baked engine (constant, prepacked weights);
- ``base/swap.onnx`` as exported, fed the pristine W0 (out, in);
- the same graph rewritten back to plain ``MatMul`` over (in, out) inputs (the layout before), fed W0ᵀ;

one decode step at context 128, 2 threads, spinning off, interleaved blocks. Medians of wall time and of
process CPU time (which the VM's stolen time does not inflate: the steadier of the two on a shared
machine), as ratios to the baked engine. Outputs of the two swap graphs are checked equal to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _in_out_graph(swap: Path, dst: Path, fed: set[str]) -> None:
    """``swap`` with its (out, in) fed weights turned back into (in, out) inputs of plain MatMuls."""
    import onnx
    from onnx import helper

    model = onnx.load(str(swap), load_external_data=False)
    for value in model.graph.input:
        if value.name in fed:
            dims = value.type.tensor_type.shape.dim
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    nodes = []
    for node in model.graph.node:
        if node.op_type == "FusedMatMul" and len(node.input) > 1 and node.input[1] in fed:
            node = helper.make_node("MatMul", list(node.input), list(node.output), name=node.name)
        elif len(node.input) > 1 and node.input[1] in fed:
            raise SystemExit(f"{swap}: {node.op_type} reads {node.input[1]}; only FusedMatMul is rewritten here")
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))  # beside swap.onnx: the same external data file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/edgelora-runtime/w2-cpu-fp32"))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from edgelora.format.layout import read_manifest_json as read_manifest
    from edgelora.format.manifest import read_manifest as read_checked
    from edgelora.runtime.sessions import session_options
    from edgelora.runtime.swap import load_w0

    folder = args.folder
    if not (folder / "manifest.json").is_file():
        from runtime import _export
        from workloads import make_w2_adapter, make_w2_base

        base = make_w2_base(folder.parent / "w2-base")
        adapters = {f"t{s}": make_w2_adapter(base, folder.parent / f"w2-t{s}", seed=s) for s in (1, 2)}
        _export(base, adapters, "cpu-fp32", folder)
    manifest = read_manifest(folder)
    swap = manifest["swap"]
    fed = set(swap["weights"])
    in_out = folder / "base" / "swap_in_out.onnx"
    _in_out_graph(folder / swap["engine"], in_out, fed)
    typed = read_checked(folder)
    w0 = load_w0(folder, typed.files, typed.swap)
    out_in_feeds = {k: np.ascontiguousarray(w0[k]) for k in fed}
    in_out_feeds = {k: np.ascontiguousarray(v.T) for k, v in out_in_feeds.items()}

    def sess(path: Path):
        return ort.InferenceSession(str(path), session_options(2, spinning=False), providers=["CPUExecutionProvider"])

    io = manifest["base"]["io"]
    rng = np.random.default_rng(0)
    seq = 128
    step = {"input_ids": rng.integers(5, int(manifest["base"]["vocab_size"]), (1, 1)),
            "attention_mask": np.ones((1, seq), np.int64)}
    step |= {n: rng.standard_normal((1, io["num_kv_heads"], seq - 1, io["head_dim"])).astype(np.float32)
             for n in io["inputs"] if n.startswith("past_key_values.")}
    task = next(iter(manifest["tasks"]))
    graphs = {"baked engine": (sess(folder / manifest["tasks"][task]["engine"]), step),
              "swap graph, fed (out, in)": (sess(folder / swap["engine"]), {**step, **out_in_feeds}),
              "swap graph, fed (in, out)": (sess(in_out), {**step, **in_out_feeds})}
    a = graphs["swap graph, fed (out, in)"][0].run(["logits"], graphs["swap graph, fed (out, in)"][1])[0]
    b = graphs["swap graph, fed (in, out)"][0].run(["logits"], graphs["swap graph, fed (in, out)"][1])[0]
    diff = float(np.abs(a - b).max())
    if diff > 1e-5:
        raise SystemExit(f"the two layouts disagree: max |Δ| {diff:.3g}")
    wall: dict[str, list[float]] = {k: [] for k in graphs}
    cpu: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(args.rounds):
        for name, (s, feeds) in graphs.items():
            s.run(None, feeds)
            for _ in range(5):
                t0, c0 = time.perf_counter(), time.process_time()
                s.run(None, feeds)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    in_out.unlink()
    rows = {}
    for name in graphs:
        rows[name] = {"wall_median_ms": statistics.median(wall[name]) * 1e3,
                      "cpu_median_ms": statistics.median(cpu[name]) * 1e3}
    base = rows["baked engine"]
    for r in rows.values():
        r["wall_vs_baked"] = r["wall_median_ms"] / base["wall_median_ms"]
        r["cpu_vs_baked"] = r["cpu_median_ms"] / base["cpu_median_ms"]
    print(f"{folder}: one decode step at context {seq}, 2 threads, {args.rounds} x 5 runs each, interleaved")
    print(f"{'':30} {'wall median':>12} {'vs baked':>9} {'CPU median':>11} {'vs baked':>9}")
    for name, r in rows.items():
        print(f"{name:30} {r['wall_median_ms']:10.2f}ms {r['wall_vs_baked']:8.3f}x {r['cpu_median_ms']:9.2f}ms "
              f"{r['cpu_vs_baked']:8.3f}x")
    print(f"(out, in) vs (in, out) outputs: max |Δ| {diff:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"folder": str(folder), "rows": rows, "max_abs_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
