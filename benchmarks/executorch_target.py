"""ExecuTorch (XNNPACK, fp32) beside ONNX Runtime (CPU, fp32) on W1, in one run, side by side.

    python benchmarks/executorch_target.py [--json out.json] [--work DIR] [--rounds 8]

W1: the bundled all-MiniLM-L6-v2 + examples/adapters/{sst2,agnews}, batch 1 × 128 tokens, 2 threads. Both
folders are written by `edgelora export` (executorch-xnnpack and cpu-fp32) into a temporary folder; then, on
the same seeded inputs, interleaved in one process (medians):
  - parity: each ExecuTorch program vs PEFT's merge_and_unload in PyTorch (from the export's check), and
    ExecuTorch vs the ONNX Runtime baked engine on the timed inputs;
  - latency: ONNX Runtime's baked task engine, ExecuTorch's merged program, ExecuTorch's branch program fed the
    task's A, B and head;
  - per-task file sizes: the merged .pte, the delta (A, B, head) — ExecuTorch; the baked engine and delta — ORT;
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
    import numpy as np
    import torch
    from edgelora.converters.executorch import export as et_export
    from edgelora.converters.executorch import runner

    from edgelora.bench import interleaved, swap_times
    from edgelora.format.delta import read_delta
    from edgelora.format.layout import read_manifest_json
    from edgelora.latency import cpu_info
    from edgelora.runtime import Runtime
    from edgelora.verify import fixed_inputs, session

    torch.set_num_threads(THREADS)
    et_dir, ort_dir = work / "executorch-xnnpack", work / "cpu-fp32"
    et_report = _export("executorch-xnnpack", et_dir)
    _export("cpu-fp32", ort_dir)
    et_man, ort_man = read_manifest_json(et_dir), read_manifest_json(ort_dir)
    feeds = fixed_inputs(int(et_man["base"]["vocab_size"]), 1, 128, seed=7)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    runner.set_threads(THREADS)
    br = et_man["branches"]
    branch = runner.load(et_dir / br["program"], et_dir / "base.ptd")
    fns, rows = {}, {}
    for name, task in et_man["tasks"].items():
        merged = runner.load(et_dir / task["program"], et_dir / "base.ptd")
        modules, head = read_delta(et_dir / task["delta"])
        task_feeds = et_export.branch_feeds(modules, br["modules"], br["ranks"], head, br["labels"])
        ort_task = ort_man["tasks"][name]
        sess = session(ort_dir / ort_task["engine"], "CPUExecutionProvider", THREADS)
        ort_logits = sess.run(["logits"], feeds)[0]
        et_logits = runner.run(merged, [ids, mask])
        br_logits = runner.run(branch, [ids, mask, *task_feeds])[..., :task["labels"]]
        fns[f"{name}: ORT baked engine"] = (lambda s=sess: s.run(None, feeds))
        fns[f"{name}: ET merged .pte"] = (lambda m=merged: runner.call(m, [ids_t, mask_t]))
        fns[f"{name}: ET branches"] = (lambda f=task_feeds: runner.call(branch, [ids_t, mask_t, *f]))
        rep = et_report["tasks"][name]
        ort_engine = ort_dir / ort_task["engine"]
        ort_bytes = sum(p.stat().st_size for p in ort_engine.parent.iterdir() if p.name.startswith("model.onnx"))
        rows[name] = {
            "parity_vs_pytorch": {"merged": rep["max_abs_diff"], "branches": rep["branches"]["max_abs_diff"]},
            "et_vs_ort_max_abs_diff": {"merged": float(np.abs(et_logits - ort_logits).max()),
                                       "branches": float(np.abs(br_logits - ort_logits).max())},
            "bytes": {"et_merged_pte": (et_dir / task["program"]).stat().st_size,
                      "et_delta": (et_dir / task["delta"]).stat().st_size,
                      "ort_baked_engine": ort_bytes,
                      "ort_delta": (ort_dir / ort_task["delta"]).stat().st_size}}
    print(f"[{time.strftime('%H:%M:%S')}] timing ...", file=sys.stderr, flush=True)
    times = interleaved(fns, rounds=rounds, per_round=10)
    for name, row in rows.items():
        ort_ms = times[f"{name}: ORT baked engine"]["median_ms"]
        row["latency_ms"] = {"ort_baked": ort_ms, "et_merged": times[f"{name}: ET merged .pte"]["median_ms"],
                             "et_branches": times[f"{name}: ET branches"]["median_ms"]}
    et_switch = et_export.switch_times(et_dir, et_man["tasks"], br["modules"], br["ranks"], br["labels"], runs=10)
    rt = Runtime.open(ort_dir, threads=THREADS)
    ort_switch = swap_times(ort_dir, read_manifest_json(ort_dir), rt, THREADS, peft=False, rounds=3)
    return {"workload": "W1: all-MiniLM-L6-v2 + sst2, agnews; batch 1 x 128 tokens", "threads": THREADS,
            "cpu": cpu_info(), "executorch": et_report["machine"]["executorch"],
            "base_bytes": {"et_base_ptd": (et_dir / "base.ptd").stat().st_size,
                           "et_branch_pte": (et_dir / br["program"]).stat().st_size},
            "tasks": rows,
            "switch_ms": {"et_load_merged_program": et_switch["load_merged_program_ms"],
                          "et_feed_branches": et_switch["feed_branches_ms"],
                          "ort_runtime_activate": ort_switch["activate_median_ms"],
                          "ort_fresh_session": ort_switch.get("open_session_median_ms")}}


def table(res: dict) -> str:
    cpu = res["cpu"]
    lines = [f"{res['workload']}, {res['threads']} threads, executorch {res['executorch']}, interleaved medians",
             f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags']) or '-'}",
             f"ExecuTorch shared base.ptd {res['base_bytes']['et_base_ptd'] / 1e6:.1f} MB, branch program "
             f"lora.pte {res['base_bytes']['et_branch_pte'] / 1e3:.0f} kB", "",
             f"{'task':8} {'engine':22} {'max|Δ| vs torch':>16} {'max|Δ| vs ORT':>14} {'latency':>10} "
             f"{'vs ORT':>7} {'task file':>10}"]
    for name, r in res["tasks"].items():
        lat, b = r["latency_ms"], r["bytes"]
        cells = [("ORT baked engine", "-", "-", lat["ort_baked"], b["ort_baked_engine"]),
                 ("ET merged .pte", f"{r['parity_vs_pytorch']['merged']:.2e}",
                  f"{r['et_vs_ort_max_abs_diff']['merged']:.2e}", lat["et_merged"], b["et_merged_pte"]),
                 ("ET branches (A,B fed)", f"{r['parity_vs_pytorch']['branches']:.2e}",
                  f"{r['et_vs_ort_max_abs_diff']['branches']:.2e}", lat["et_branches"], b["et_delta"])]
        for engine, vs_torch, vs_ort, ms, size in cells:
            lines.append(f"{name:8} {engine:22} {vs_torch:>16} {vs_ort:>14} {ms:8.2f}ms "
                         f"{ms / lat['ort_baked']:6.2f}x {size / 1e6:8.2f}MB")
        lines.append(f"{'':8} {'(ORT delta file)':22} {'':>16} {'':>14} {'':>10} {'':>7} "
                     f"{b['ort_delta'] / 1e6:8.2f}MB")
    sw = res["switch_ms"]
    lines += ["", "task switch (median): ET load merged program over base.ptd "
              f"{sw['et_load_merged_program']:.1f} ms; ET feed branch program a delta {sw['et_feed_branches']:.2f} ms; "
              f"ORT runtime activate {sw['ort_runtime_activate']:.2f} ms; ORT fresh session on a task engine "
              f"{sw['ort_fresh_session']:.0f} ms"]
    return "\n".join(lines)


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
