"""`edgelora build` on the W1 pipeline (8 tasks × 2 CPU targets, benchmarks/pipelines/w1.toml): cold wall time
with --jobs 1 and --jobs 2, a warm re-run, one adapter changed, a build killed mid-way then re-run, and the Ray
executor; each run is the real command (`python -m edgelora.cli build`) in a subprocess, timed end to end.

    python benchmarks/build_pipeline.py [--work DIR] [--skip-jobs1] [--skip-ray] [--json FILE]

Deployment folders are compared by their manifests, which list the size and sha256 of every file (the trained
adapters' paths, which lie in each run's own cache, set aside); report.* files hold timings and are not part of
the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "benchmarks" / "pipelines" / "w1.toml"


def absolute_pipeline(src: Path, dst: Path, adapters: Path) -> Path:
    """A copy of ``src`` whose relative paths are made absolute, with the example adapters copied under
    ``adapters`` (the benchmark changes one of them)."""
    text = src.read_text(encoding="utf-8")

    def fix(m: re.Match[str]) -> str:
        path = (src.parent / m.group(2)).resolve()
        if path.parent == (REPO / "examples" / "adapters"):
            shutil.copytree(path, adapters / path.name, dirs_exist_ok=True)
            path = adapters / path.name
        return f'{m.group(1)}"{path}"'

    text = re.sub(r'((?:adapter|file|data) = )"(\.\.?/[^"]+)"', fix, text)
    text = re.sub(r'^(output|cache) = .*$', "", text, flags=re.M)
    dst.write_text(text, encoding="utf-8")
    return dst


def run(pipeline: Path, cache: Path, out: Path, *extra: str, kill_after: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "edgelora.cli", "build", str(pipeline), "--cache", str(cache), "-o", str(out),
           "-q", "--json", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    if kill_after is not None:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return {"wall_s": round(time.perf_counter() - t0, 1), "killed": True}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr[-2000:]}") from None
    return {"wall_s": round(wall, 1), "exit": proc.returncode, "report": report}


def manifests(out: Path) -> dict[str, dict]:
    found = {}
    for m in sorted(out.glob("*/manifest.json")):
        if m.parent.name.endswith(".bundle"):
            continue
        data = json.loads(m.read_text())
        for t in data["tasks"].values():
            t["adapter_path"] = None
        found[m.parent.name] = data
    return found


def change_adapter(folder: Path) -> None:
    """Scale one LoRA B matrix by 1.01: a new adapter version, as a re-trained one would be."""
    from safetensors.numpy import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})


def built_cells(r: dict) -> list[str]:
    return [f"{c['task']}/{c['target']}" for c in r["report"]["cells"] if c["built"]]


def main() -> None:  # noqa: C901  (one scenario after another, each a few lines)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench-pipeline")
    ap.add_argument("--skip-jobs1", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work = args.work.resolve()
    sys.path.insert(0, str(REPO))
    from edgelora.latency import cpu_line

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    pipeline = absolute_pipeline(PIPELINE, args.work / "w1.toml", args.work / "adapters")
    res: dict = {"cpu": cpu_line(), "pipeline": str(PIPELINE.relative_to(REPO))}
    print(res["cpu"], flush=True)

    a_cache, a_out = args.work / "cache-a", args.work / "out-a"
    cold = run(pipeline, a_cache, a_out, "-j", "2")
    res["cold_jobs2"] = {"wall_s": cold["wall_s"], "exit": cold["exit"], "built": cold["report"]["built"],
                         "failures": cold["report"]["failures"]}
    print(f"cold, --jobs 2: {cold['wall_s']} s, exit {cold['exit']}, built {cold['report']['built']}", flush=True)
    from edgelora.pipeline.report import table

    print(table(cold["report"]), flush=True)
    res["cells"] = cold["report"]["cells"]
    res["targets"] = cold["report"]["targets"]
    res["train"] = {k: {"train_seconds": v.get("train_seconds")} for k, v in cold["report"]["train"].items()}
    reference = manifests(a_out)

    warm = run(pipeline, a_cache, a_out, "-j", "2")
    res["warm"] = {"wall_s": warm["wall_s"], "built": warm["report"]["built"],
                   "ratio_vs_cold": round(warm["wall_s"] / cold["wall_s"], 4)}
    print(f"warm, nothing changed: {warm['wall_s']} s = {res['warm']['ratio_vs_cold']:.1%} of cold; built "
          f"{warm['report']['built']}", flush=True)

    change_adapter(args.work / "adapters" / "sst2")
    changed = run(pipeline, a_cache, a_out, "-j", "2")
    res["one_adapter_changed"] = {"wall_s": changed["wall_s"], "built": changed["report"]["built"],
                                  "cells_rebuilt": built_cells(changed)}
    print(f"sst2 adapter changed: {changed['wall_s']} s; cells rebuilt: {built_cells(changed)}; built "
          f"{changed['report']['built']}", flush=True)
    after_change = manifests(a_out)

    if not args.skip_kill:
        k_cache, k_out = args.work / "cache-k", args.work / "out-k"
        kills = []
        for frac in (0.3, 0.6):
            kills.append(run(pipeline, k_cache, k_out, "-j", "2", kill_after=cold["wall_s"] * frac))
        again = run(pipeline, k_cache, k_out, "-j", "2")
        same = manifests(k_out) == after_change
        res["killed_then_rerun"] = {"kills_at_s": [k["wall_s"] for k in kills], "rerun_wall_s": again["wall_s"],
                                    "rerun_built": again["report"]["built"], "identical_to_uninterrupted": same}
        print(f"killed at {[k['wall_s'] for k in kills]} s, re-run {again['wall_s']} s (built "
              f"{again['report']['built']}): folders identical to the uninterrupted build: {same}", flush=True)

    if not args.skip_jobs1:
        one = run(pipeline, args.work / "cache-1", args.work / "out-1", "-j", "1")
        res["cold_jobs1"] = {"wall_s": one["wall_s"], "exit": one["exit"],
                             "jobs2_speedup": round(one["wall_s"] / cold["wall_s"], 2),
                             "identical_to_jobs2": manifests(args.work / "out-1") == after_change}
        print(f"cold, --jobs 1: {one['wall_s']} s; --jobs 2 is {res['cold_jobs1']['jobs2_speedup']}x faster; "
              f"folders identical: {res['cold_jobs1']['identical_to_jobs2']}", flush=True)

    if not args.skip_ray:
        ray = run(pipeline, args.work / "cache-r", args.work / "out-r", "-j", "2", "--executor", "ray")
        res["cold_ray"] = {"wall_s": ray["wall_s"], "exit": ray["exit"],
                           "identical_to_local": manifests(args.work / "out-r") == after_change}
        print(f"cold, --executor ray (local, 2 CPUs): {ray['wall_s']} s; folders byte-identical to the local "
              f"executor's: {res['cold_ray']['identical_to_local']}", flush=True)
    res["reference_unchanged_folders"] = sorted(reference)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("cells", "targets")}, indent=1, default=str))


if __name__ == "__main__":
    main()
