"""ExecuTorch (XNNPACK, fp32) beside ONNX Runtime (CPU, fp32) on W1, in one run, side by side.

    python benchmarks/executorch_target.py [--json out.json] [--work DIR] [--rounds 8]

W1: the bundled all-MiniLM-L6-v2 + examples/adapters/{sst2,agnews}, batch 1 × 128 tokens, 2 threads. Both
folders are written by `edgelora export` (executorch-xnnpack and cpu-fp32) into a temporary folder; then
`edgelora bench ET_DIR --beside CPU_FP32_DIR` (the same code) measures, on the same seeded inputs, interleaved
in one process (medians):
  - parity: each ExecuTorch program vs PEFT in PyTorch (unmerged, on the timed inputs; merge_and_unload, from
    the export's check), and ExecuTorch vs the ONNX Runtime baked engine on the timed inputs;
  - latency: ONNX Runtime's baked task engine, ExecuTorch's merged program, ExecuTorch's branch program fed the
    task's A, B and head;
  - per-task file sizes: the merged .pte, the delta (A, B, head) — ExecuTorch; the baked engine's own file and
    the delta — ORT;
  - task switch: ExecuTorch loading a merged program over the shared base.ptd, feeding the branch program
    another delta; ONNX Runtime's edgelora runtime activate (in-place swap) and a fresh session on a task engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import W1_ADAPTERS  # noqa: E402

THREADS = 2


def _export(target: str, out: Path) -> dict:
    from edgelora.export import export
    from edgelora.target import load_target

    print(f"[{time.strftime('%H:%M:%S')}] export {target} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = export(None, W1_ADAPTERS, load_target(target), out, threads=THREADS, force=True)
    print(f"[{time.strftime('%H:%M:%S')}]   {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return res.report


def run(work: Path, rounds: int) -> dict:
    """Both exports, then `edgelora bench` of the ExecuTorch folder beside the cpu-fp32 one (edgelora/bench.py:
    ``bench_executorch`` over ``converters/executorch/bench.py``)."""
    from edgelora.bench import bench

    et_dir, ort_dir = work / "executorch-xnnpack", work / "cpu-fp32"
    _export("executorch-xnnpack", et_dir)
    _export("cpu-fp32", ort_dir)
    print(f"[{time.strftime('%H:%M:%S')}] timing ...", file=sys.stderr, flush=True)
    res = bench(et_dir, threads=THREADS, rounds=rounds, beside=ort_dir)
    return {"workload": "W1: all-MiniLM-L6-v2 + sst2, agnews; batch 1 x 128 tokens", **res}


def table(res: dict) -> str:
    from edgelora.converters.executorch.bench import table as et_table

    from edgelora.latency import cpu_line

    return f"{res['workload']}\n" + et_table(res, cpu_line())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the two exports (default: a temporary one).")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from edgelora.converters.executorch.runner import unavailable

    why = unavailable()
    if why is not None:
        sys.exit(f"error: {why}")
    if args.work is not None:
        res = run(args.work, args.rounds)
    else:
        with tempfile.TemporaryDirectory(prefix="edgelora-et-") as tmp:
            res = run(Path(tmp), args.rounds)
    print(table(res))
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
