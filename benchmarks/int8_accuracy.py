"""int8 accuracy on real text, short and long: PyTorch vs fp32 engine vs dynamic int8 (cpu-int8) vs calibrated
static QDQ int8 (cpu-int8-qdq), W1, both example tasks; plus engine size and latency.

    python benchmarks/int8_accuracy.py [--json out.json] [--work /tmp/edgelora-int8] [--reuse]

- SST-2 (``sst2`` adapter): the whole dev file (6,735 phrases) and its long-sentence subset: the dev rows of at
  least 20 words (851 rows, sentence-level reviews: the inputs where dynamic int8 lost 0.8 points).
- AG News (``agnews`` adapter): the 1,000 rows of ``train.tsv`` its training held out (``--val-fraction 0.1
  --seed 0``, re-split here the same way) and their longest half (at least the median length).
- Calibration (static): the first 1,500 texts of each task's *training* rows, never an evaluated row.
- Each task's baked engine of each folder runs every row at its own length (batches of 32 sorted by length);
  PyTorch is the PEFT-merged model in fp32. Latency: batch 1 × 128 tokens, 2 threads, medians of interleaved
  rounds, the fp32 folder's fused base engine as the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import W1_ADAPTERS  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
REPO = HERE.parent
LONG_WORDS = 20


def _rows(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.split("\t") for line in lines if line.strip()]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _sets() -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    sst_x, sst_y = _rows(DATA / "sst2" / "dev.tsv")
    long_idx = [i for i, x in enumerate(sst_x) if len(x.split()) >= LONG_WORDS]
    _, (ag_x, ag_y) = _agnews_split()
    median = statistics.median(len(x.split()) for x in ag_x)
    ag_long = [i for i, x in enumerate(ag_x) if len(x.split()) >= median]
    return {"sst2": {"dev": (sst_x, sst_y),
                     f"dev, >= {LONG_WORDS} words": ([sst_x[i] for i in long_idx], [sst_y[i] for i in long_idx])},
            "agnews": {"held-out 10%": (ag_x, ag_y),
                       "held-out, longest half": ([ag_x[i] for i in ag_long], [ag_y[i] for i in ag_long])}}


def _agnews_split() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """AG News train.tsv split as the example adapter was trained (``--val-fraction 0.1 --seed 0``):
    (training rows, the 1,000 held-out rows)."""
    from edgelora.data import split

    x, y = _rows(DATA / "agnews" / "train.tsv")
    train, val = split(list(zip(x, y, strict=True)), 0.1, 0)
    return ([a for a, _ in train], [b for _, b in train]), ([a for a, _ in val], [b for _, b in val])


def _export(target: str, out: Path, calibrate: dict[str, Path] | None, reuse: bool) -> float:
    from edgelora.export import ExportFailed, export
    from edgelora.target import load_target

    if reuse and (out / "manifest.json").is_file():
        return float("nan")
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] export {target} ...", file=sys.stderr, flush=True)
    try:
        export(None, W1_ADAPTERS, load_target(target), out, force=True, keep_failed=True, calibrate=calibrate)
    except ExportFailed as exc:
        print(f"  (kept, with failures: {exc})", file=sys.stderr)
    return time.perf_counter() - t0


def _engine_predict(folder: Path, task: str, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    manifest = json.loads((folder / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / manifest["tasks"][task]["engine"]), opts,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    order = np.argsort([len(t) for t in texts])
    out = np.zeros(len(texts), np.int64)
    for k in range(0, len(texts), 32):
        idx = order[k:k + 32]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds = {n: enc[n].astype(np.int64) for n in ("input_ids", "attention_mask") if n in names}
        out[idx] = sess.run(["logits"], feeds)[0].argmax(-1)
    return out


def _torch_predict(task: str, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    import torch
    from transformers import AutoTokenizer

    from edgelora.merge import merge_into_model
    from edgelora.prepare import prepare

    p = prepare(None, W1_ADAPTERS[task])
    merge_into_model(p.model, p.plan)
    tok = AutoTokenizer.from_pretrained(str(p.base_path))
    torch.set_num_threads(2)
    order = np.argsort([len(t) for t in texts])
    out = np.zeros(len(texts), np.int64)
    with torch.no_grad():
        for k in range(0, len(texts), 32):
            idx = order[k:k + 32]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            logits = p.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            out[idx] = logits.argmax(-1).numpy()
    return out, dict(p.model.config.id2label)


def _latency(folders: dict[str, Path], rounds: int = 8) -> dict[str, float]:
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(1000, 30000, (1, 128)).astype(np.int64)
    sessions = {}
    for name, folder in folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(folder / manifest["tasks"]["sst2"]["engine"]), opts,
                                              providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(10):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _engine_mb(folder: Path, task: str) -> float:
    """The weight bytes a baked task engine reads: every initializer it holds or points to in a data file (the
    fp32 engines share data files with the branch graph, so file sizes would count tensors it never reads)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    manifest = json.loads((folder / "manifest.json").read_text())
    model = onnx.load(str(folder / manifest["tasks"][task]["engine"]), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if uses_external_data(init):
            total += int(next(e.value for e in init.external_data if e.key == "length"))
        else:
            total += len(init.raw_data) or len(init.SerializeToString())
    return total / 1e6


def main() -> None:
    from edgelora.latency import cpu_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-int8"))
    ap.add_argument("--reuse", action="store_true", help="reuse folders already in --work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cal_dir = args.work / "calibration"
    cal_dir.mkdir(exist_ok=True)
    calibrate = {}
    sst_train, _ = _rows(DATA / "sst2" / "train.tsv")
    (ag_train, _), _ = _agnews_split()
    for task, texts in (("sst2", sst_train), ("agnews", ag_train)):  # training texts only, never the eval rows
        (cal_dir / f"{task}.txt").write_text("\n".join(texts[:1500]) + "\n", encoding="utf-8")
        calibrate[task] = cal_dir / f"{task}.txt"
    folders = {"fp32": args.work / "cpu-fp32", "dynamic int8": args.work / "cpu-int8",
               "static QDQ int8": args.work / "cpu-int8-qdq"}
    seconds = {"fp32": _export("cpu-fp32", folders["fp32"], None, args.reuse),
               "dynamic int8": _export("cpu-int8", folders["dynamic int8"], None, args.reuse),
               "static QDQ int8": _export("cpu-int8-qdq", folders["static QDQ int8"], calibrate, args.reuse)}
    result: dict = {"cpu": cpu_line(), "export_seconds": seconds, "accuracy": {}}
    for task, sets in _sets().items():
        for set_name, (texts, labels) in sets.items():
            print(f"[{time.strftime('%H:%M:%S')}] {task} {set_name} ({len(texts)} rows) ...", file=sys.stderr,
                  flush=True)
            pred, id2label = _torch_predict(task, texts)
            y = np.array([int(v) if v.isdigit() else {n: i for i, n in id2label.items()}[v] for v in labels])
            row = {"rows": len(texts), "PyTorch": float((pred == y).mean() * 100)}
            for name, folder in folders.items():
                row[name] = float((_engine_predict(folder, task, texts) == y).mean() * 100)
            result["accuracy"][f"{task}: {set_name}"] = row
    lat = _latency(folders)
    result["latency_ms"] = lat
    result["engine_mb"] = {name: _engine_mb(folder, "sst2") for name, folder in folders.items()}
    qdq_report = json.loads((folders["static QDQ int8"] / "report.json").read_text()).get("quantization", {})
    result["qdq_kept_float"] = qdq_report.get("kept_float")
    result["qdq_trials"] = qdq_report.get("trials")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(r: dict) -> str:
    names = ["PyTorch", "fp32", "dynamic int8", "static QDQ int8"]
    lines = ["W1: all-MiniLM-L6-v2 + example adapters; accuracy % (drop vs PyTorch, points)", r["cpu"], ""]
    lines.append(f"{'set':38} {'rows':>5} " + " ".join(f"{n:>22}" for n in names))
    for set_name, row in r["accuracy"].items():
        cells = [f"{row['PyTorch']:22.2f}"] + [f"{row[n]:8.2f} ({row['PyTorch'] - row[n]:+.2f})".rjust(22)
                                             for n in names[1:]]
        lines.append(f"{set_name:38} {row['rows']:5d} " + " ".join(cells))
    fp = r["latency_ms"]["fp32"]
    lines.append("")
    lines.append("sst2 task engine, batch 1 x 128, 2 threads: " + ", ".join(
        f"{k} {v:.1f} ms ({fp / v:.2f}x fp32)" for k, v in r["latency_ms"].items()))
    mb = r["engine_mb"]
    lines.append("task engine weight bytes: " + ", ".join(f"{k} {v:.1f} MB ({v / mb['fp32']:.2f}x)"
                                                          for k, v in mb.items()))
    lines.append(f"static QDQ: MatMuls kept float by the sensitivity pass: {r['qdq_kept_float']}")
    lines.append(f"  trials (float nodes -> agreement with fp32 on held-out training texts): "
                 f"{[(t['float_nodes'], t['agreement']) for t in r['qdq_trials'] or []]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
