"""Trust acceptance on W1, measured: a classify soak under task switching, kill -9 during export, and what the
runtime's new checks cost at open and activate.

    python benchmarks/trust.py [--work /tmp/edgelora-trust] [--json out.json] [--skip-soak] [--skip-kill]
                               [--skip-open] [--calls 6000] [--kills 10]
                               [--baseline-python /path/to/old-checkout/.venv/bin/python]

W1: the bundled all-MiniLM-L6-v2 with the example adapters (sst2: 2 labels, agnews: 4), cpu-fp32, 2 threads.

- soak: 4 threads classify real sentences (SST-2 sample, examples/data; AG News-style headlines) — two naming
  their task (``task=``), two using the active one — while a fifth switches tasks every ~3 ms; for swap and
  unmerged modes. Each answer must be exactly one task's answer for that text, from a single-threaded
  reference: label (from that task's names) and probability. Counts calls, wrong labels, exceptions.
- kill: ``edgelora export`` (cpu-int8, so ONNX Runtime's quantizer writes temp files too) killed with SIGKILL at
  ``--kills`` points spread over its run, into a folder that already holds an export (the --force swap is
  killed too), with its own TMPDIR. After each kill: bytes of debris beside the output and in TMPDIR; after
  the next complete export: the same (0 expected), and the output opens.
- open: fresh processes, alternating: ``Runtime.open`` (with every check: sizes, hashes of W0 and deltas, W0
  finite, every delta validated), the first ``activate``, then median ``activate`` (a rebuild each time) and
  a run. With ``--baseline-python`` (a checkout of the commit before the checks, with its own venv), the
  same in that interpreter on its own export, interleaved, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from workloads import W1_ADAPTERS  # noqa: E402

HEADLINES = ["Stocks fell as oil prices rose for a third day", "A late goal won the cup final",
             "New chip doubles phone battery life", "Leaders meet to end the border dispute",
             "Central bank keeps rates on hold", "Star striker signs a four-year deal",
             "Researchers map the genome of wheat", "Floods displace thousands in the delta"]


def _texts() -> list[str]:
    from edgelora.data import read_classification

    return [e.text for e in read_classification(REPO / "examples/data/sst2-dev-500.tsv")][:40] + HEADLINES


def _export(target: str, out: Path, python: str = sys.executable, force: bool = False) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").is_file() and not force:
        return out
    args = [python, "-m", "edgelora.cli", "export", "--target", target, "-o", str(out), "-q", "--force"]
    for name, path in W1_ADAPTERS.items():
        args += ["--adapter", f"{name}={path}"]
    # cwd outside the repository: `-m edgelora.cli` must import the interpreter's own edgelora, not ./edgelora
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=out.parent)
    return out


# ---------------------------------------------------------------------------------------------- soak
def soak(folder: Path, unmerged: bool, calls: int) -> dict:
    import numpy as np

    from edgelora.runtime import Runtime

    rt = Runtime.open(folder, threads=2, unmerged=unmerged)
    texts = _texts()
    tasks = rt.tasks
    ref = {t: rt.classify(texts, task=t) for t in tasks}
    owner = {label: t for t in tasks for label in rt.labels(t)}
    rt.activate(tasks[0])
    stop = threading.Event()
    wrong: list[str] = []
    errors: list[str] = []
    done = [0] * 4

    def reader(k: int) -> None:
        rng = np.random.default_rng(k)
        while not stop.is_set():
            i = int(rng.integers(len(texts)))
            task = tasks[int(rng.integers(len(tasks)))] if k % 2 else None
            try:
                [(label, prob)] = rt.classify([texts[i]], task=task)
            except Exception as exc:  # noqa: BLE001 - counted, that is the point
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                done[k] += 1
            who = owner.get(label)
            if who is None or (task and who != task) or ref[who][i][0] != label or abs(ref[who][i][1] - prob) > 1e-5:
                wrong.append(f"{texts[i]!r} task={task}: {label} {prob:.6f}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    switches = 0
    while sum(done) < calls:
        rt.activate(tasks[switches % len(tasks)])
        switches += 1
        time.sleep(0.003)
    stop.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return {"mode": rt.mode, "calls": sum(done), "named_task_calls": done[1] + done[3], "switches": switches,
            "wrong_labels": len(wrong), "exceptions": len(errors), "seconds": round(seconds, 1),
            "examples": (wrong + errors)[:3]}


# ---------------------------------------------------------------------------------------------- kill -9
def _size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _debris(parent: Path, out: Path, tmpdir: Path, clean: set[str]) -> dict:
    extra = [p for p in parent.iterdir() if p != out]
    tmp_extra = [p for p in tmpdir.iterdir() if p.name not in clean]
    return {"beside_output": [p.name for p in extra], "beside_bytes": sum(_size(p) for p in extra),
            "tmpdir": [p.name for p in tmp_extra], "tmpdir_bytes": sum(_size(p) for p in tmp_extra)}


def kill_points(work: Path, kills: int) -> dict:
    from edgelora.runtime import Runtime

    parent, tmpdir = work / "kill", work / "kill-tmp"
    for p in (parent, tmpdir):
        subprocess.run(["rm", "-rf", str(p)], check=True)
        p.mkdir(parents=True)
    out = parent / "out"
    env = {**os.environ, "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "edgelora.cli", "export", "--target", "cpu-int8", "-o", str(out), "-q", "--force"]
    for name, path in W1_ADAPTERS.items():
        cmd += ["--adapter", f"{name}={path}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warm caches: later runs are alike
    # a timed run: when its temporary folder appears (imports, loading and checks come first) and when it ends
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = None
    while proc.poll() is None:
        if started is None and any(".edgelora-tmp-" in p.name for p in parent.iterdir()):
            started = time.perf_counter() - t0
        time.sleep(0.05)
    full = time.perf_counter() - t0
    started = started or 0.0
    clean = {p.name for p in tmpdir.iterdir()}  # torch's own caches: a finished export leaves these too
    rows = []
    for k in range(kills):  # spread over the part of the run that writes
        at = started + (full - started) * (k + 0.5) / kills
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        row = {"kill_at_s": round(at, 1), **_debris(parent, out, tmpdir, clean)}
        row["output_whole"] = Runtime.open(out).tasks == sorted(W1_ADAPTERS) or Runtime.open(out).tasks == list(
            W1_ADAPTERS)
        rows.append(row)
        print(f"  kill {k + 1} at {at:5.1f} s: {row['beside_bytes'] / 1e6:7.1f} MB beside the output "
              f"{row['beside_output']}, {row['tmpdir_bytes'] / 1e6:7.1f} MB in TMPDIR", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    after = _debris(parent, out, tmpdir, clean)
    return {"export_seconds": round(full, 1), "writes_from_s": round(started, 1), "kills": rows,
            "after_next_export": after,
            "max_debris_bytes_between": max(r["beside_bytes"] + r["tmpdir_bytes"] for r in rows)}


# ---------------------------------------------------------------------------------------------- open
_OPEN_PROBE = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from edgelora.runtime import Runtime
t_import = time.perf_counter() - t0
folder = sys.argv[1]
t0 = time.perf_counter(); rt = Runtime.open(folder, threads=2); t_open = time.perf_counter() - t0
tasks = list(rt.tasks)
t0 = time.perf_counter(); rt.activate(tasks[0]); t_first = time.perf_counter() - t0
forget = getattr(rt, "_forget_built", lambda: None)  # new runtimes keep built tasks: time the rebuild alike
acts = []
for i in range(40):
    forget()
    name = [*tasks, None][(i + 1) % (len(tasks) + 1)]
    t0 = time.perf_counter(); rt.activate(name); acts.append(time.perf_counter() - t0)
flips = []
if hasattr(rt, "_forget_built"):
    rt.activate(tasks[0]); rt.activate(tasks[1])
    for i in range(40):
        t0 = time.perf_counter(); rt.activate(tasks[i % 2]); flips.append(time.perf_counter() - t0)
ids = np.random.default_rng(0).integers(1000, 29000, (1, 128))
rt.activate(tasks[0]); rt.run(input_ids=ids)
runs = []
for _ in range(20):
    t0 = time.perf_counter(); rt.run(input_ids=ids); runs.append(time.perf_counter() - t0)
med = lambda v: sorted(v)[len(v) // 2] * 1e3
print(json.dumps({"open_ms": t_open * 1e3, "first_activate_ms": t_first * 1e3, "activate_median_ms": med(acts),
                  "flip_median_ms": med(flips) if flips else None, "run_median_ms": med(runs)}))
"""


def open_costs(work: Path, baseline: str | None, rounds: int) -> dict:
    sides = {"new": (sys.executable, _export("cpu-fp32", work / "w1-cpu-fp32"))}
    if baseline:
        sides["before"] = (baseline, _export("cpu-fp32", work / "w1-cpu-fp32-before", python=baseline))
    samples: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, (python, folder) in sides.items():
            res = subprocess.run([python, "-c", _OPEN_PROBE, str(folder)], check=True, capture_output=True,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=folder.parent)
            samples[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    out: dict = {}
    for name, rows in samples.items():
        out[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if rows[0][k] is not None}
    if "before" in out:
        out["ratio_new_vs_before"] = {k: out["new"][k] / out["before"][k] for k in out["before"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-trust"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=6000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7, help="fresh processes per side for the open costs")
    ap.add_argument("--baseline-python", default=None)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-open", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from edgelora.latency import cpu_info, cpu_line

    result: dict = {"cpu": cpu_info()}
    print(cpu_line())
    if not args.skip_soak:
        folder = _export("cpu-fp32", args.work / "w1-cpu-fp32")
        result["soak"] = [soak(folder, unmerged, args.calls) for unmerged in (False, True)]
        print("\nclassify soak: 4 threads (2 with task=, 2 on the active task), a switch every ~3 ms, W1 cpu-fp32")
        print(f"{'mode':10} {'calls':>7} {'task=':>7} {'switches':>9} {'wrong':>6} {'exceptions':>11} {'seconds':>8}")
        for r in result["soak"]:
            print(f"{r['mode']:10} {r['calls']:7} {r['named_task_calls']:7} {r['switches']:9} {r['wrong_labels']:6} "
                  f"{r['exceptions']:11} {r['seconds']:8}")
    if not args.skip_kill:
        print(f"\nkill -9 during `edgelora export --target cpu-int8 --force` (W1), {args.kills} points:", flush=True)
        k = result["kill"] = kill_points(args.work, args.kills)
        after = k["after_next_export"]
        print(f"  export alone {k['export_seconds']} s, writing from {k['writes_from_s']} s; most debris between kills "
              f"{k['max_debris_bytes_between'] / 1e6:.1f} MB; after the next export: "
              f"{after['beside_bytes'] + after['tmpdir_bytes']} bytes ({after['beside_output'] + after['tmpdir']}), "
              f"output whole after every kill: {all(r['output_whole'] for r in k['kills'])}")
    if not args.skip_open:
        o = result["open"] = open_costs(args.work, args.baseline_python, args.rounds)
        print(f"\nopen and activate, W1 cpu-fp32, 2 threads, medians of {args.rounds} fresh processes per side")
        keys = ["open_ms", "first_activate_ms", "activate_median_ms", "flip_median_ms", "run_median_ms"]
        print(f"{'':22}" + "".join(f"{k:>20}" for k in keys))
        for side in [s for s in ("before", "new") if s in o]:
            print(f"{side:22}" + "".join(f"{o[side].get(k, float('nan')):20.2f}" for k in keys))
        if "ratio_new_vs_before" in o:
            print(f"{'new / before':22}" + "".join(f"{o['ratio_new_vs_before'].get(k, float('nan')):19.2f}x"
                                                  for k in keys))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
