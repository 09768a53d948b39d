"""LoRA vs full fine-tuning on a real model: the paper's training claims (Hu et al. 2021, §4.2).

W1 of ../shared/DESIGN.md: the bundled all-MiniLM-L6-v2, SST-2 from ../shared/data. Both runs
use edgelora's own training loop (the one `edgelora train` runs), the same batches in the same
order (same seed), the same step budget and batch size; only what is trainable and the learning
rate differ. Each run is a child process of this one, so its memory is its own:

- trainable parameters (LoRA: r=8 on query,value + the classifier head),
- training memory: peak RSS during training minus RSS once model and data are loaded and the
  model has run one inference batch (that first run maps the math libraries' code and buffers,
  the same for both methods); the kernel's peak counter is reset at that point,
- step throughput, side by side: a third process holds both models and alternates one LoRA step
  and one full step over the same batches, so machine noise hits both alike; run once with
  edgelora's allocator setting (see edgelora.train.return_freed_memory_to_os) and once with
  glibc's default, so the setting cannot flatter either side,
- validation accuracy on sst2/dev.tsv after the whole step budget.

    python benchmarks/train_lora_vs_full.py              # table + JSON on stdout
    python benchmarks/train_lora_vs_full.py --json out.json --steps 1000
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
DATA = HERE.parent.parent / "shared" / "data" / "sst2"


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
    """Tokenized SST-2 and the training pieces, as `edgelora train` builds them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer

    from edgelora.base import bundled_base_path
    from edgelora.data import read_classification
    from edgelora.train import tokenize_classification

    torch.set_num_threads(args.threads)
    base = bundled_base_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    labels = {"0": 0, "1": 1}
    train_items = tokenize_classification(tokenizer, read_classification(args.train), labels, 128, args.train)
    dev_items = tokenize_classification(tokenizer, read_classification(args.dev), labels, 128, args.dev)
    return base, train_items, dev_items


def _model(method: str, base, args: argparse.Namespace):
    """(model, trainable params, total params, TrainConfig) for "lora" or "full"."""
    from edgelora.base import HeadSpec
    from edgelora.train import TrainConfig, load_for_training, lora_config, seed_everything

    lora = method == "lora"
    cfg = TrainConfig(r=args.r, alpha=args.alpha if args.alpha > 0 else 2.0 * args.r,
                      lr=args.lora_lr if lora else args.full_lr, batch_size=args.batch_size,
                      max_steps=args.steps, epochs=100, seed=args.seed,
                      targets=tuple(args.lora_targets.split(",")),
                      loraplus_ratio=args.loraplus_ratio if lora and args.loraplus_ratio > 0 else None)
    seed_everything(cfg.seed)
    model = load_for_training(base, "sequence-classification", HeadSpec(2, ("0", "1"), args.pooling), cfg)
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
    base, train_items, dev_items = _setup(args)
    model, params, total, cfg = _model(args.child, base, args)
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
    base, train_items, _ = _setup(args)
    runs = {}
    for method in ("lora", "full"):
        model, params, _, cfg = _model(method, base, args)
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


def run_child(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method]
    for key in ("steps", "batch_size", "lora_lr", "full_lr", "threads", "seed", "warmup", "train", "dev",
                "throughput_steps", "lora_targets", "loraplus_ratio", "pooling", "r", "alpha"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    what = f"{args.throughput_steps} alternating steps" if method.startswith("throughput") else f"{args.steps} steps"
    print(f"[{time.strftime('%H:%M:%S')}] {method}: {what} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"{method} run failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(lora: dict, full: dict, speed: list[dict], args: argparse.Namespace) -> dict:
    mb = 1024 * 1024
    lean, default = speed
    summary = {
        "workload": f"W1: all-MiniLM-L6-v2 on SST-2, batch {args.batch_size}, {args.steps} steps, "
        f"{args.threads} threads",
        "lora": lora,
        "full": full,
        "throughput": speed,
        "ratios": {
            "trainable_fraction": lora["trainable_parameters"] / full["trainable_parameters"],
            "train_memory_lora_over_full": lora["train_memory_bytes"] / full["train_memory_bytes"],
            "peak_rss_lora_over_full": lora["peak_rss_bytes"] / full["peak_rss_bytes"],
            "step_throughput_lora_over_full": lean["full_median_step_s"] / lean["lora_median_step_s"],
            "step_throughput_lora_over_full_glibc_default": (
                default["full_median_step_s"] / default["lora_median_step_s"]),
            "accuracy_lora_minus_full_points": 100 * (lora["dev_accuracy"] - full["dev_accuracy"]),
        },
    }
    r = summary["ratios"]
    rows = [
        ("trainable parameters", f"{lora['trainable_parameters']:,}", f"{full['trainable_parameters']:,}",
         f"{100 * r['trainable_fraction']:.3f}% (goal ≤ 0.5%)"),
        ("training memory (peak - loaded)", f"{lora['train_memory_bytes'] / mb:.0f} MB",
         f"{full['train_memory_bytes'] / mb:.0f} MB", f"{r['train_memory_lora_over_full']:.2f}x (goal ≤ 0.6)"),
        ("whole-process peak RSS", f"{lora['peak_rss_bytes'] / mb:.0f} MB", f"{full['peak_rss_bytes'] / mb:.0f} MB",
         f"{r['peak_rss_lora_over_full']:.2f}x"),
        ("median step time", f"{1000 * lean['lora_median_step_s']:.0f} ms",
         f"{1000 * lean['full_median_step_s']:.0f} ms",
         f"{r['step_throughput_lora_over_full']:.2f}x faster (goal ≥ 1.25x)"),
        ("  same, glibc default allocator", f"{1000 * default['lora_median_step_s']:.0f} ms",
         f"{1000 * default['full_median_step_s']:.0f} ms",
         f"{r['step_throughput_lora_over_full_glibc_default']:.2f}x faster"),
        ("wall time of the step budget", f"{lora['train_wall_s']:.0f} s", f"{full['train_wall_s']:.0f} s",
         f"{full['train_wall_s'] / lora['train_wall_s']:.2f}x (separate processes)"),
        ("SST-2 dev accuracy", f"{100 * lora['dev_accuracy']:.2f}%", f"{100 * full['dev_accuracy']:.2f}%",
         f"{r['accuracy_lora_minus_full_points']:+.2f} points (goal ≥ -1, LoRA ≥ 85%)"),
    ]
    head = ("", "LoRA", "full", "LoRA vs full")
    widths = [max(len(row[i]) for row in [*rows, head]) for i in range(4)]
    print(summary["workload"])
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps for both runs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--lora-targets", default="query,value", help="LoRA target modules")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=0,
                    help="LoRA alpha (0: 2 x r, scale 2 as the paper's r=8, alpha=16)")
    ap.add_argument("--pooling", choices=["cls", "mean"], default="mean",
                    help="what the classifier reads, for both methods (mean: all-MiniLM-L6-v2's own pooling)")
    ap.add_argument("--loraplus-ratio", type=float, default=0, help="LoRA+ lr ratio of B over A (0: plain LoRA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the step-time median")
    ap.add_argument("--train", default=str(DATA / "train.tsv"))
    ap.add_argument("--dev", default=str(DATA / "dev.tsv"))
    ap.add_argument("--json", dest="json_out", default=None, help="also write the result JSON here")
    ap.add_argument("--throughput-steps", type=int, default=60, help="alternating steps per method")
    ap.add_argument("--child", choices=["lora", "full", "throughput-lean", "throughput-default"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = throughput_child(args) if args.child.startswith("throughput") else child(args)
        print(json.dumps(result))
        return
    for f in (args.train, args.dev):
        if not Path(f).is_file():
            raise SystemExit(f"error: {f} not found; this benchmark reads SST-2 from ../shared/data")
    speed = [run_child("throughput-lean", args), run_child("throughput-default", args)]
    lora = run_child("lora", args)
    full = run_child("full", args)
    summary = report(lora, full, speed, args)
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
