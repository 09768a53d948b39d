"""int8 on every CPU: W1 `cpu-int8` with the three weight recipes side by side — accuracy, logits vs PyTorch,
speed on this CPU's kernels, and the same engines on an AVX2 CPU without VNNI (QEMU's Haswell) against this one.

    python benchmarks/int8_cpus.py [--json out.json] [--avx2-texts 32] [--rounds 20]

Recipes (``edgelora/lora/quant.py``): ``int8`` (ONNX Runtime's full range, what cpu-int8 shipped before),
``int8-pairsafe`` (every pair of weight rows |q| <= 128: what the int8 targets ship now), ``int8-reduced``
(ONNX Runtime's ``reduce_range``, 7-bit weights: its docs' advice for AVX2). Each is one ``edgelora export`` of the
bundled base with both example adapters and ``--eval sst2=examples/data/sst2-dev-500.tsv``; the base engines are
timed interleaved (2 threads, medians). ``--avx2-texts N`` runs N SST-2 dev texts through each folder's runtime
here and under ``qemu-x86_64 -cpu Haswell`` (ONNX Runtime's AVX2 u8·s8 kernels, slow: emulated) and reports how
far the emulated AVX2 logits move from this CPU's (0 for a recipe that cannot saturate, up to float noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"int8": "pair_safe = false", "int8-pairsafe": "pair_safe = true",
           "int8-reduced": "pair_safe = false\nreduce_range = true"}
_RUN = """
import sys, numpy as np
from edgelora.runtime import Runtime
folder, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [line.rstrip("\\n").split("\\t") for line in open(sys.argv[4], encoding="utf-8")][1:n + 1]
rt = Runtime.open(folder, threads=2)
np.savez(out, **{t: rt.predict(text=[r[0] for r in rows], task=t).logits for t in rt.tasks})
"""


def _target(tmp: Path, recipe: str) -> Path:
    text = (REPO / "targets" / "cpu-int8.toml").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("pair_safe", "reduce_range", "name ="))]
    body = "\n".join(lines).replace("[quantization]", f"[quantization]\n{RECIPES[recipe]}")
    path = tmp / f"{recipe}.toml"
    path.write_text(f'name = "cpu-{recipe}"\n{body}\n')
    return path


def _export(tmp: Path, recipe: str) -> tuple[Path, dict]:
    out = tmp / recipe
    cmd = [sys.executable, "-m", "edgelora.cli", "export", "--target", str(_target(tmp, recipe)), "-o", str(out),
           "-q", "--keep-failed", "--eval", f"sst2={REPO / 'examples/data/sst2-dev-500.tsv'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    report = json.loads((out / "report.json").read_text())
    return out, {"exit": res.returncode, "error": res.stderr.strip().splitlines()[-1:] if res.returncode else [],
                 "tasks": {n: {k: t.get(k) for k in ("accuracy", "torch_accuracy", "cosine", "max_abs_diff")}
                           for n, t in report["tasks"].items()}}


def _speed(folders: dict[str, Path], rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    from edgelora.latency import latency_inputs

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {r: ort.InferenceSession(str(f / "base" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                for r, f in folders.items()}
    spec = {"kind": "sequence-classification"}
    feeds = {r: latency_inputs(s, spec, 1, 128, 30522) for r, s in sessions.items()}
    times: dict[str, list[float]] = {r: [] for r in sessions}
    for _ in range(rounds):  # interleaved blocks: the machine's noise falls on every recipe alike
        for r, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(5):
                s.run(None, feeds[r])
            times[r].append((time.perf_counter() - t0) / 5 * 1e3)
    return {r: statistics.median(v) for r, v in times.items()}


def _avx2(folders: dict[str, Path], n: int, tmp: Path) -> dict[str, dict[str, float]] | str:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return "qemu-x86_64 not installed (apt-get install qemu-user)"
    script = tmp / "run.py"
    script.write_text(_RUN)
    data = str(REPO / "examples/data/sst2-dev-500.tsv")
    out: dict[str, dict[str, float]] = {}
    for recipe, folder in folders.items():
        here, there = tmp / f"{recipe}.here.npz", tmp / f"{recipe}.avx2.npz"
        subprocess.run([sys.executable, str(script), str(folder), str(here), str(n), data], check=True)
        subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(script), str(folder), str(there), str(n), data],
                       check=True, stderr=subprocess.DEVNULL)
        a, b = np.load(here), np.load(there)
        for task in a.files:
            out[f"{recipe} / {task}"] = {
                "max_abs_diff": float(np.abs(a[task] - b[task]).max()),
                "agreement": float((a[task].argmax(-1) == b[task].argmax(-1)).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--avx2-texts", type=int, default=0, help="SST-2 dev texts run under QEMU's Haswell (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgelora.latency import cpu_info, cpu_line

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        exports = {r: _export(tmp, r) for r in RECIPES}
        folders = {r: f for r, (f, _) in exports.items()}
        result = {"cpu": cpu_info(), "exports": {r: rep for r, (_, rep) in exports.items()},
                  "base_engine_ms": _speed(folders, args.rounds)}
        if args.avx2_texts:
            result["avx2_vs_here"] = _avx2(folders, args.avx2_texts, tmp)
    print(cpu_line())
    full = result["base_engine_ms"]["int8"]
    print(f"{'recipe':<14} {'exit':>4} {'sst2 acc (torch)':>18} {'sst2 cos':>9} {'agnews cos':>10} {'base ms':>8} "
          f"{'vs int8':>7}")
    for r, rep in result["exports"].items():
        s, a = rep["tasks"].get("sst2", {}), rep["tasks"].get("agnews", {})
        acc = f"{100 * (s.get('accuracy') or 0):.2f} ({100 * (s.get('torch_accuracy') or 0):.2f})"
        ms = result["base_engine_ms"][r]
        print(f"{r:<14} {rep['exit']:>4} {acc:>18} {s.get('cosine') or 0:>9.4f} {a.get('cosine') or 0:>10.4f} "
              f"{ms:>8.2f} {ms / full:>6.2f}x")
    avx2 = result.get("avx2_vs_here")
    if isinstance(avx2, dict):
        print(f"\nAVX2 without VNNI (QEMU Haswell) vs this CPU, {args.avx2_texts} SST-2 dev texts, default mode")
        for key, v in avx2.items():
            print(f"  {key:<24} max |Δ| {v['max_abs_diff']:.2e}   argmax agreement {v['agreement']:.3f}")
    elif avx2:
        print(f"\nAVX2 check skipped: {avx2}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
