"""The on-device runtime on a deployment folder: swap tasks in place, classify, time it, mix tasks.

    python examples/runtime_tasks.py out/cpu-fp32

Imports numpy and onnxruntime only (and tokenizers for the text): what runs on the device.
"""

from __future__ import annotations

import statistics
import sys
import time

from edgelora.runtime import Runtime

SENTENCES = ["a gorgeous, witty, seductive movie", "Stocks fell as oil prices rose to a record high"]


def main(folder: str) -> None:
    rt = Runtime.open(folder, threads=2)
    print(f"{folder}: tasks {', '.join(rt.tasks)}; swaps by {rt.mode}")
    for task in rt.tasks:
        rt.activate(task)
        for text, (label, p) in zip(SENTENCES, rt.classify(SENTENCES), strict=True):
            print(f"  {task:>8}: {label:>10} {p:.3f}  {text}")
    # the tasks and the base in turn: one state more than the runtime keeps built, so every switch rebuilds
    order = [*rt.tasks, None]
    times = []
    for i in range(40):
        t0 = time.perf_counter()
        rt.activate(order[i % len(order)])
        times.append((time.perf_counter() - t0) * 1e3)
    print(f"activate (rebuilding W0 + s·B·A): median {statistics.median(times):.2f} ms over {len(times)} swaps")
    # naming the task per call: no shared active task, what a multi-threaded app wants
    print(f"  classify(task='{rt.tasks[0]}'): {rt.classify(SENTENCES[:1], task=rt.tasks[0])}, active still {rt.active}")
    # one batch whose rows belong to different tasks: each row gets its own task's LoRA (base/lora.onnx)
    rows = ["sst2", "agnews"] if {"sst2", "agnews"} <= set(rt.tasks) else rt.tasks[: len(SENTENCES)]
    out = rt.run(text=SENTENCES[: len(rows)], tasks=rows)
    for text, task, row in zip(SENTENCES, rows, out["logits"], strict=False):
        labels = rt.labels(task) or []
        print(f"  mixed batch, {task:>8}: {labels[int(row.argmax())] if labels else int(row.argmax())}  {text}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/cpu-fp32")
