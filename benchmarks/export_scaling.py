"""What a task costs at export: one task vs four in one run, and patched engines vs re-exported ones.

    python benchmarks/export_scaling.py [--json out.json] [--work /tmp/edgelora-scaling] [--skip-w2]

Each export is `edgelora export` in a fresh process, timed from outside (imports and model loading included,
as a user runs it). W1: the bundled base with the example adapters (4 tasks: sst2, agnews and copies of
both under other names), cpu-fp32 and cpu-int8. W2: the SmolLM2-135M architecture (seeded) with four r=16
q,k,v,o adapters made by peft, cpu-fp32 and cpu-int4. Per target:

- wall time with 1 task and with 4; each added task's cost, (t4 - t1) / 3, as a share of t1 (goal ≤ 10%);
- the 1-task export again with ``--bake reexport`` (the merged model exported again, the old path): its task
  engine vs the patched one on fixed inputs (max |Δ|, cosine) and, for W1, accuracy of both on the SST-2 sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from workloads import W1_ADAPTERS, make_w2_adapter, make_w2_base  # noqa: E402

SST2_SAMPLE = REPO / "examples/data/sst2-dev-500.tsv"


def _export(work: Path, name: str, base: Path | None, adapters: dict[str, Path], target: str, *extra: str
            ) -> tuple[dict, float, Path]:
    out = work / name
    args = [sys.executable, "-m", "edgelora.cli", "export", "--target", target, "-o", str(out), "-q", "--force",
            "--json", "--keep-failed", *extra]
    if base is not None:
        args += ["--base", str(base)]
    for task, path in adapters.items():
        args += ["--adapter", f"{task}={path}"]
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, cwd=work,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - t0
    if res.returncode == 1 and (out / "report.json").is_file():  # a check missed its tolerance: timed all the same
        print(f"  {res.stderr.strip()[:300]}", file=sys.stderr)
        return json.loads((out / "report.json").read_text()), seconds, out
    if res.returncode != 0:
        raise SystemExit(f"{name}: export failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout), seconds, out


def _compare(a: Path, b: Path, task: str) -> dict:
    """The task engine of two folders on the same fixed inputs (decoders: a prefill with an empty cache)."""
    import numpy as np
    import onnxruntime as ort

    from edgelora.verify import fixed_inputs

    outs = []
    for folder in (a, b):
        m = json.loads((folder / "manifest.json").read_text())
        io = m["tasks"][task]["engine_io"]
        feeds = fixed_inputs(m["base"]["vocab_size"], 2, 64)
        if io["kind"] == "causal-lm":
            feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
            feeds |= {n: np.zeros((2, io["num_kv_heads"], 0, io["head_dim"]), np.float32)
                      for n in io["inputs"] if n.startswith("past_key_values.")}
        sess = ort.InferenceSession(str(folder / m["tasks"][task]["engine"]), providers=["CPUExecutionProvider"])
        outs.append(sess.run(["logits"], feeds)[0].astype(np.float64))
    x, y = outs
    cosine = float((x.ravel() @ y.ravel()) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return {"max_abs_diff": float(np.abs(x - y).max()), "cosine": cosine,
            "argmax_agreement": float(np.mean(x.argmax(-1) == y.argmax(-1)))}


def _scale(work: Path, label: str, base: Path | None, tasks: dict[str, Path], target: str, evals: list[str]) -> dict:
    one = dict(list(tasks.items())[:1])
    r1, t1, d1 = _export(work, f"{label}-{target}-1", base, one, target, *evals)
    r4, t4, _ = _export(work, f"{label}-{target}-4", base, tasks, target, *evals)
    rr, tr, dr = _export(work, f"{label}-{target}-1-reexport", base, one, target, "--bake", "reexport", *evals)
    task = next(iter(one))
    row = {"one_task_s": round(t1, 1), "four_tasks_s": round(t4, 1), "added_task_s": round((t4 - t1) / 3, 2),
           "added_task_share": round((t4 - t1) / 3 / t1, 4), "one_task_reexport_s": round(tr, 1),
           "bake": r1["tasks"][task]["bake"], "patched_vs_reexported": _compare(d1, dr, task),
           "device_bundle": r1.get("device_bundle"), "failures": r1.get("failures") or []}
    if evals:
        row["accuracy_patched"] = r1["tasks"][task]["accuracy"]
        row["accuracy_reexported"] = rr["tasks"][task]["accuracy"]
        row["accuracy_torch"] = r1["tasks"][task]["torch_accuracy"]
    for d in (d1, dr, work / f"{label}-{target}-4"):
        shutil.rmtree(d, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-scaling"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-w2", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from edgelora.latency import cpu_info, cpu_line

    result: dict = {"cpu": cpu_info(), "rows": {}}
    w1 = {"sst2": W1_ADAPTERS["sst2"], "agnews": W1_ADAPTERS["agnews"], "sst2b": W1_ADAPTERS["sst2"],
          "agnewsb": W1_ADAPTERS["agnews"]}
    evals = ["--eval", f"sst2={SST2_SAMPLE}"]
    for target in ("cpu-fp32", "cpu-int8"):
        result["rows"][f"W1 {target}"] = _scale(args.work, "w1", None, w1, target, evals)
    if not args.skip_w2:
        base = make_w2_base(args.work / "w2-base")
        w2 = {f"t{s}": make_w2_adapter(base, args.work / f"w2-t{s}", seed=s) for s in (1, 2, 3, 4)}
        for target in ("cpu-fp32", "cpu-int4"):
            result["rows"][f"W2 {target}"] = _scale(args.work, "w2", base, w2, target, [])
    print(cpu_line())
    print(f"{'':14} {'1 task':>8} {'4 tasks':>8} {'+1 task':>8} {'share':>7} {'1 task, re-export':>18} "
          f"{'patched vs re-exported':>26}")
    for name, r in result["rows"].items():
        c = r["patched_vs_reexported"]
        print(f"{name:14} {r['one_task_s']:7.1f}s {r['four_tasks_s']:7.1f}s {r['added_task_s']:7.2f}s "
              f"{r['added_task_share']:6.1%} {r['one_task_reexport_s']:17.1f}s "
              f"  max|Δ| {c['max_abs_diff']:.2e} cos {c['cosine']:.6f}")
        if "accuracy_patched" in r:
            print(f"{'':14} accuracy on the SST-2 sample: patched {r['accuracy_patched']:.2%}, re-exported "
                  f"{r['accuracy_reexported']:.2%}, PyTorch {r['accuracy_torch']:.2%}")
        if r["failures"]:
            print(f"{'':14} the export's own checks failed (timed all the same): {'; '.join(r['failures'])[:160]}")
        if r.get("device_bundle"):
            b = r["device_bundle"]
            print(f"{'':14} device bundle (1 task) {b['bytes'] / 1e6:.1f} MB = {b['vs_base_and_deltas']:.3f}x "
                  "the base engine + deltas")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
