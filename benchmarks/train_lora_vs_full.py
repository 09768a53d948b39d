"""LoRA vs full fine-tuning on a real model: the paper's training claims (Hu et al. 2021, §4.2).

W1 of ../shared/DESIGN.md: the bundled all-MiniLM-L6-v2, SST-2 (or AG News) from ../shared/data. Both runs
use edgelora's own training loop (the one `edgelora train` runs), the same batches in the same
order (same seed), the same step budget and batch size; only what is trainable and the learning
rate differ. Each run is a child process of this one, so its memory is its own:

- trainable parameters (LoRA: `edgelora train`'s defaults unless told, + the classifier head),
- training memory: peak RSS during training minus RSS once model and data are loaded and the
  model has run one inference batch (that first run maps the math libraries' code and buffers,
  the same for both methods); the kernel's peak counter is reset at that point,
- step throughput, side by side: a third process holds both models and alternates one LoRA step
  and one full step over the same batches, so machine noise hits both alike; run once with
  edgelora's allocator setting (see edgelora.train.return_freed_memory_to_os) and once with
  glibc's default, so the setting cannot flatter either side,
- validation accuracy after the whole step budget: SST-2's dev.tsv; for AG News the 10% of train.tsv the
  example adapter holds out (``edgelora train --val-fraction 0.1``, seed 0).

Both methods train the same model: the classifier reads what ``--pooling`` says (mean: the masked mean of
the token states, what all-MiniLM-L6-v2 was trained to produce; cls: transformers' [CLS] + pooler head).

``--study`` trains LoRA for every rank in {4, 8, 16} and target set in {q,v / q,k,v,o / all linear} on the
same budget, beside one full fine-tuning run, and prints accuracy, trainable share, training memory and
step time per configuration. ``--results DIR`` keeps each run's JSON there and reuses it on the next call
(a study is ten runs: it can be stopped and resumed).

    python benchmarks/train_lora_vs_full.py              # table + JSON on stdout
    python benchmarks/train_lora_vs_full.py --json out.json --steps 1000
    python benchmarks/train_lora_vs_full.py --dataset agnews --steps 300
    python benchmarks/train_lora_vs_full.py --study --steps 600 --results benchmarks/results/study
    python benchmarks/train_lora_vs_full.py --example examples/adapters/sst2     # a trained adapter's accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATA = SHARED / "sst2"
# the study's target sets; "output.dense" names both attention.output.dense and the FFN's output.dense
TARGET_SETS = {"qv": "query,value", "qkvo": "query,key,value,attention.output.dense",
               "all": "query,key,value,output.dense,intermediate.dense"}
STUDY_RANKS = (4, 8, 16)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


def _setup(args: argparse.Namespace):
    """Tokenized training and validation rows and the base, as `edgelora train` builds them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer

    from edgelora.base import bundled_base_path
    from edgelora.data import read_classification, split
    from edgelora.train import tokenize_classification

    torch.set_num_threads(args.threads)
    base = bundled_base_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    train_ex = read_classification(args.train)
    dev_ex = read_classification(args.dev) if args.dev else None
    if dev_ex is None:  # AG News: the example adapter's split (--val-fraction 0.1, seed 0)
        train_ex, dev_ex = split(train_ex, 0.1, 0)
    labels = {name: i for i, name in enumerate(sorted({e.label for e in train_ex}))}
    train_items = tokenize_classification(tokenizer, train_ex, labels, 128, args.train)
    dev_items = tokenize_classification(tokenizer, dev_ex, labels, 128, args.dev or args.train)
    return base, train_items, dev_items, labels


def _model(method: str, base, labels: dict[str, int], args: argparse.Namespace):
    """(model, trainable params, total params, TrainConfig) for "lora" or "full"."""
    from edgelora.base import HeadSpec
    from edgelora.train import TrainConfig, load_for_training, lora_config, seed_everything

    lora = method == "lora"
    cfg = TrainConfig(r=args.r, alpha=args.alpha if args.alpha > 0 else 2.0 * args.r,
                      lr=args.lora_lr if lora else args.full_lr, batch_size=args.batch_size,
                      max_steps=args.steps, epochs=100, seed=args.seed,
                      targets=tuple(TARGET_SETS.get(args.lora_targets, args.lora_targets).split(",")),
                      loraplus_ratio=args.loraplus_ratio if lora and args.loraplus_ratio > 0 else None)
    seed_everything(cfg.seed)
    model = load_for_training(base, "sequence-classification", HeadSpec(len(labels), tuple(labels), args.pooling), cfg)
    total = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import get_peft_model

        seed_everything(cfg.seed)
        model = get_peft_model(model, lora_config(cfg, "sequence-classification", model))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, total, cfg


def _warm_up(model, items) -> None:
    """One inference batch of the longest examples: maps the math libraries' code and buffers."""
    import torch

    from edgelora.train import collate_classification

    longest = sorted(items, key=lambda it: -len(it[0]))[:32]
    batch = collate_classification(longest, 0)
    batch.pop("labels")
    model.eval()
    with torch.inference_mode():
        model(**batch)
    model.train()


def child(args: argparse.Namespace) -> dict:
    """One method, the whole step budget: memory and accuracy."""
    import gc

    from edgelora.train import (
        collate_classification,
        evaluate_classification,
        make_optimizer,
        return_freed_memory_to_os,
        train_loop,
    )

    return_freed_memory_to_os()  # what `edgelora train` does
    base, train_items, dev_items, labels = _setup(args)
    model, params, total, cfg = _model(args.child, base, labels, args)
    _warm_up(model, train_items)
    gc.collect()
    rss_loaded = _status("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    train_loop(model, params, train_items, lambda b: collate_classification(b, 0), cfg, None, progress=False,
               optimizer=make_optimizer(model, params, cfg))
    wall = time.perf_counter() - t0
    peak = _status("VmHWM")
    metrics = evaluate_classification(model, dev_items, 0)
    return {
        "method": args.child,
        "config": _config(args, args.child),
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": total,
        "lr": cfg.lr,
        "steps": cfg.max_steps,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": peak,
        "train_memory_bytes": peak - rss_loaded,
        "train_wall_s": wall,
        "dev_accuracy": metrics["accuracy"],
        "dev_loss": metrics["loss"],
    }


def throughput_child(args: argparse.Namespace) -> dict:
    """Both models in one process; alternate one LoRA step and one full step on the same batch."""
    import torch

    from edgelora.train import (
        collate_classification,
        length_bucketed_batches,
        make_optimizer,
        return_freed_memory_to_os,
    )

    lean = args.child == "throughput-lean"
    if lean:
        return_freed_memory_to_os()
    base, train_items, _, labels = _setup(args)
    runs = {}
    for method in ("lora", "full"):
        model, params, _, cfg = _model(method, base, labels, args)
        opt = make_optimizer(model, params, cfg)  # as train_loop builds it
        runs[method] = (model, opt)
        model.train()
    order = length_bucketed_batches([len(ids) for ids, _ in train_items], args.batch_size,
                                    torch.Generator().manual_seed(args.seed))
    times: dict[str, list[float]] = {"lora": [], "full": []}
    for i, idx in enumerate(order[: args.throughput_steps + args.warmup]):
        batch = collate_classification([train_items[j] for j in idx], 0)
        for method in (("lora", "full") if i % 2 == 0 else ("full", "lora")):
            model, opt = runs[method]
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[method].append(time.perf_counter() - t0)
    return {
        "allocator": "edgelora (mmap threshold 256 KB)" if lean else "glibc default",
        "steps_each": len(times["lora"]),
        "lora_median_step_s": statistics.median(times["lora"]),
        "full_median_step_s": statistics.median(times["full"]),
        "lora_total_s": sum(times["lora"]),
        "full_total_s": sum(times["full"]),
    }


CHILD_ARGS = ("steps", "batch_size", "lora_lr", "full_lr", "threads", "seed", "warmup", "train", "dev",
              "throughput_steps", "lora_targets", "loraplus_ratio", "pooling", "r", "alpha")


def _config(args: argparse.Namespace, method: str) -> str:
    """The run's name in a results folder: everything that changes its outcome."""
    data = Path(args.train).parent.name
    if method == "full":
        return f"{data}-full-{args.pooling}-lr{args.full_lr:g}-{args.steps}steps-seed{args.seed}"
    plus = f"-loraplus{args.loraplus_ratio:g}" if args.loraplus_ratio > 0 else ""
    alpha = args.alpha if args.alpha > 0 else 2.0 * args.r
    return (f"{data}-lora-{args.pooling}-r{args.r}-a{alpha:g}-{args.lora_targets.replace(',', '+')}"
            f"-lr{args.lora_lr:g}{plus}-{args.steps}steps-seed{args.seed}")


def run_child(method: str, args: argparse.Namespace) -> dict:
    cached = Path(args.results) / f"{_config(args, method)}.json" if args.results and method in ("lora", "full") \
        else None
    if cached is not None and cached.is_file():
        print(f"[{time.strftime('%H:%M:%S')}] {method}: {cached.name} (kept from an earlier run)", file=sys.stderr)
        return json.loads(cached.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method]
    for key in CHILD_ARGS:
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    what = f"{args.throughput_steps} alternating steps" if method.startswith("throughput") else f"{args.steps} steps"
    label = f"r={args.r} {args.lora_targets}" if method == "lora" else ""
    print(f"[{time.strftime('%H:%M:%S')}] {method} {label}: {what} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"{method} run failed (exit {res.returncode})")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _workload(args: argparse.Namespace) -> str:
    from edgelora.latency import cpu_info

    cpu = cpu_info()
    data = Path(args.train).parent.name
    return (f"W1: all-MiniLM-L6-v2 on {data}, {args.pooling} pooling, batch {args.batch_size}, {args.steps} steps, "
            f"{args.threads} threads; CPU {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])})")


def _lora_name(args: argparse.Namespace) -> str:
    return f"r={args.r} {args.lora_targets}"


def report(lora: dict, full: dict, speed: list[dict], args: argparse.Namespace) -> dict:
    """The comparison table; ``speed`` is empty with ``--no-throughput`` (no step-time rows)."""
    mb = 1024 * 1024
    data = Path(args.train).parent.name
    ratios = {
        "trainable_fraction": lora["trainable_parameters"] / full["trainable_parameters"],
        "train_memory_lora_over_full": lora["train_memory_bytes"] / full["train_memory_bytes"],
        "peak_rss_lora_over_full": lora["peak_rss_bytes"] / full["peak_rss_bytes"],
        "accuracy_lora_minus_full_points": 100 * (lora["dev_accuracy"] - full["dev_accuracy"]),
    }
    rows = [
        ("trainable parameters", f"{lora['trainable_parameters']:,}", f"{full['trainable_parameters']:,}",
         f"{100 * ratios['trainable_fraction']:.3f}% (goal ≤ 0.5%)"),
        ("training memory (peak - loaded)", f"{lora['train_memory_bytes'] / mb:.0f} MB",
         f"{full['train_memory_bytes'] / mb:.0f} MB", f"{ratios['train_memory_lora_over_full']:.2f}x (goal ≤ 0.6)"),
        ("whole-process peak RSS", f"{lora['peak_rss_bytes'] / mb:.0f} MB", f"{full['peak_rss_bytes'] / mb:.0f} MB",
         f"{ratios['peak_rss_lora_over_full']:.2f}x"),
    ]
    if speed:
        lean, default = speed
        ratios["step_throughput_lora_over_full"] = lean["full_median_step_s"] / lean["lora_median_step_s"]
        ratios["step_throughput_lora_over_full_glibc_default"] = (default["full_median_step_s"]
                                                                  / default["lora_median_step_s"])
        rows += [
            ("median step time", f"{1000 * lean['lora_median_step_s']:.0f} ms",
             f"{1000 * lean['full_median_step_s']:.0f} ms",
             f"{ratios['step_throughput_lora_over_full']:.2f}x faster (goal ≥ 1.25x)"),
            ("  same, glibc default allocator", f"{1000 * default['lora_median_step_s']:.0f} ms",
             f"{1000 * default['full_median_step_s']:.0f} ms",
             f"{ratios['step_throughput_lora_over_full_glibc_default']:.2f}x faster"),
        ]
    rows += [
        ("wall time of the step budget", f"{lora['train_wall_s']:.0f} s", f"{full['train_wall_s']:.0f} s",
         f"{full['train_wall_s'] / lora['train_wall_s']:.2f}x (separate processes)"),
        (f"{data} validation accuracy", f"{100 * lora['dev_accuracy']:.2f}%", f"{100 * full['dev_accuracy']:.2f}%",
         f"{ratios['accuracy_lora_minus_full_points']:+.2f} points (goal ≥ -1)"),
    ]
    summary = {"workload": _workload(args), "lora_config": _lora_name(args), "lora": lora, "full": full,
               "throughput": speed, "ratios": ratios}
    print(summary["workload"])
    print(f"LoRA: {_lora_name(args)}, lr {args.lora_lr:g}; full fine-tuning: lr {args.full_lr:g}")
    _table(("", "LoRA", "full", "LoRA vs full"), rows)
    return summary


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [*rows, head]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def study(args: argparse.Namespace) -> dict:
    """LoRA at every rank x target set on one budget, beside full fine-tuning; one child process per run."""
    full = run_child("full", args)
    grid = [(targets, r) for targets in TARGET_SETS for r in STUDY_RANKS]
    for extra in args.extra or []:  # "R:TARGETS", e.g. 2:all
        r, _, targets = extra.partition(":")
        if targets not in TARGET_SETS or not r.isdigit():
            raise SystemExit(f"error: --extra {extra!r}; give RANK:TARGETS, TARGETS one of {', '.join(TARGET_SETS)}")
        grid.append((targets, int(r)))
    runs = []
    for targets, r in grid:
        run_args = argparse.Namespace(**{**vars(args), "r": r, "lora_targets": targets})
        runs.append((targets, r, run_child("lora", run_args)))
    mb = 1024 * 1024
    rows = []
    full_step = full["train_wall_s"] / full["steps"]
    for targets, r, res in runs:
        share = res["trainable_parameters"] / full["trainable_parameters"]
        gap = 100 * (res["dev_accuracy"] - full["dev_accuracy"])
        memory = res["train_memory_bytes"] / full["train_memory_bytes"]
        faster = full_step / (res["train_wall_s"] / res["steps"])
        missed = [name for name, ok in (("gap", gap >= -1), ("share", share <= 0.005), ("memory", memory <= 0.6),
                                        ("speed", faster >= 1.25)) if not ok]
        rows.append((f"r={r} {targets}", f"{100 * res['dev_accuracy']:.2f}%", f"{gap:+.2f}",
                     f"{res['trainable_parameters']:,}", f"{100 * share:.3f}%",
                     f"{res['train_memory_bytes'] / mb:.0f} MB ({memory:.2f}x)",
                     f"{1000 * res['train_wall_s'] / res['steps']:.0f} ms ({faster:.2f}x)",
                     "all met" if not missed else "misses " + ", ".join(missed)))
    rows.append(("full fine-tuning", f"{100 * full['dev_accuracy']:.2f}%", "", f"{full['trainable_parameters']:,}",
                 "100%", f"{full['train_memory_bytes'] / mb:.0f} MB",
                 f"{1000 * full['train_wall_s'] / full['steps']:.0f} ms", ""))
    print(_workload(args))
    print(f"LoRA lr {args.lora_lr:g} (alpha = 2r), full fine-tuning lr {args.full_lr:g}; step time = wall time of the "
          "budget / steps, one process per run")
    print("goals: gap ≥ -1 point, share ≤ 0.5%, training memory ≤ 0.6x full, step ≥ 1.25x faster than full")
    _table(("LoRA", "accuracy", "vs full", "trainable", "share", "train memory", "step time", "goals"), rows)
    return {"workload": _workload(args), "full": full,
            "lora": [{"targets": t, "target_modules": TARGET_SETS[t], "r": r, **res} for t, r, res in runs]}


LONG_WORDS = 20  # SST-2's sentence-level reviews (as benchmarks/int8_accuracy.py)


def example(args: argparse.Namespace) -> dict:
    """A trained adapter folder's accuracy, merged in PyTorch: on the whole validation set and its longest texts
    (SST-2: the dev rows of ≥ 20 words; AG News: the held-out rows at or above the median length)."""
    import statistics

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from edgelora.data import read_classification, split
    from edgelora.merge import merge_into_model
    from edgelora.prepare import prepare

    torch.set_num_threads(args.threads)
    rows = read_classification(args.dev) if args.dev else split(read_classification(args.train), 0.1, 0)[1]
    values = sorted({r.label for r in read_classification(args.train)})  # class ids as `edgelora train` numbers them
    words = [len(r.text.split()) for r in rows]
    cut = LONG_WORDS if args.dev else statistics.median(words)
    p = prepare(None, args.example)
    merge_into_model(p.model, p.plan)
    tok = AutoTokenizer.from_pretrained(str(p.base_path))
    order = np.argsort([len(r.text) for r in rows])
    pred = np.zeros(len(rows), np.int64)
    with torch.inference_mode():
        for k in range(0, len(rows), 64):
            idx = order[k:k + 64]
            enc = tok([rows[i].text for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred[idx] = p.model(**enc).logits.argmax(-1).numpy()
    gold = np.array([values.index(r.label) for r in rows])
    long = np.array(words) >= cut
    data = Path(args.train).parent.name
    out = {"adapter": str(args.example), "pooling": p.head.pooling, "dataset": data, "rows": len(rows),
           "accuracy": float((pred == gold).mean()), "long_rows": int(long.sum()), "long_min_words": cut,
           "long_accuracy": float((pred[long] == gold[long]).mean())}
    print(f"{args.example} ({p.head.pooling} pooling) on {data}; CPU {_workload(args).split('CPU ')[1]}")
    _table(("set", "rows", "accuracy"), [
        ("validation" if args.dev is None else "dev", f"{len(rows):,}", f"{100 * out['accuracy']:.2f}%"),
        (f"longest: ≥ {cut:g} words", f"{out['long_rows']:,}", f"{100 * out['long_accuracy']:.2f}%")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["sst2", "agnews"], default="sst2",
                    help="sst2: train.tsv / dev.tsv; agnews: train.tsv, 10%% held out (seed 0)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps for both runs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--lora-targets", default="qv",
                    help=f"LoRA target modules, or one of the study's sets ({', '.join(TARGET_SETS)})")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=0,
                    help="LoRA alpha (0: 2 x r, scale 2 as the paper's r=8, alpha=16)")
    ap.add_argument("--pooling", choices=["cls", "mean"], default="mean",
                    help="what the classifier reads, for both methods (mean: all-MiniLM-L6-v2's own pooling)")
    ap.add_argument("--loraplus-ratio", type=float, default=0, help="LoRA+ lr ratio of B over A (0: plain LoRA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the step-time median")
    ap.add_argument("--train", default=None, help="training TSV (default: the dataset's train.tsv)")
    ap.add_argument("--dev", default=None, help="validation TSV (default: sst2's dev.tsv; agnews: held out)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the result JSON here")
    ap.add_argument("--results", default=None, help="keep each run's JSON in this folder and reuse it")
    ap.add_argument("--study", action="store_true", help="the rank x target study instead of one comparison")
    ap.add_argument("--example", default=None, metavar="ADAPTER",
                    help="instead: a trained adapter's accuracy on the dataset's validation rows and their longest")
    ap.add_argument("--extra", action="append", metavar="R:TARGETS",
                    help="with --study, one more LoRA configuration (e.g. 2:all); may be repeated")
    ap.add_argument("--throughput-steps", type=int, default=60, help="alternating steps per method")
    ap.add_argument("--no-throughput", action="store_true", help="skip the side-by-side step-time processes")
    ap.add_argument("--child", choices=["lora", "full", "throughput-lean", "throughput-default"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train is None:
        args.train = str(SHARED / args.dataset / "train.tsv")
        if args.dev is None and args.dataset == "sst2":
            args.dev = str(DATA / "dev.tsv")
    if args.child:
        result = throughput_child(args) if args.child.startswith("throughput") else child(args)
        print(json.dumps(result))
        return
    for f in (args.train, args.dev):
        if f is not None and not Path(f).is_file():
            raise SystemExit(f"error: {f} not found; this benchmark reads its data from ../shared/data")
    if args.example:
        summary = example(args)
    elif args.study:
        summary = study(args)
    else:
        speed = [] if args.no_throughput else [run_child("throughput-lean", args),
                                               run_child("throughput-default", args)]
        lora = run_child("lora", args)
        full = run_child("full", args)
        summary = report(lora, full, speed, args)
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
