"""What a build re-derives instead of trusting its cache: an assembled deployment folder is checked here, on the
machine that publishes it, before it takes the output's place.

The cache is untrusted storage: a signature (``cache.py``) proves a cell was written by a build holding the key,
but a build without the key, or a key that leaked, proves nothing. So, with or without a key, for each task of the
assembled folder:

- its delta is computed again from its adapter (seconds) and must equal the folder's delta byte for byte;
- its engine is run against a fresh PyTorch reference, the base model with the adapter injected by PEFT (not
  edgelora's merge), on the inputs the export checks on, and held to the target's tolerance;
- the on-device runtime, swapping the task in on the folder's base engine, must compute what the task's engine
  computes (the export's check, against the engine itself instead of a reference stored beside it);
- its accuracy on its eval set is measured on the folder's engine (with PyTorch+PEFT's beside it): these are the
  numbers the gates read, and a cell whose record says otherwise is not what it claims;
- the base engine alone is held to the PyTorch base model (hidden states' cosine, as the export does).

A check that misses names the cell it blames. A cell built by this build is trusted to be what it is: its misses
are the export's own quality failures, reported as such and published as before. A cell read from the cache that
misses is a :class:`Suspect`: the folder is not published, and the build rebuilds the cell and assembles again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeloraError
from ..target import Target


class Suspect(EdgeloraError):
    """Cells from the cache that the assembled folder proves wrong (``cells``: cell name -> why)."""

    def __init__(self, cells: Mapping[str, str]) -> None:
        self.cells = dict(cells)
        super().__init__("; ".join(f"cell {name} {why}" for name, why in self.cells.items()) + ": not published")


def base_cell_name(label: str) -> str:
    return f"base/{label}"


def task_cell_name(task: str, label: str) -> str:
    return f"task/{task}/{label}"


def _session(target: Target, path: Path, threads: int) -> Any:
    from ..converters import get_backend
    from ..runtime.sessions import session_options

    return get_backend(target.backend).session(path, target.provider, session_options(threads))


def _text_inputs(texts: Mapping[str, list[str]], task: str | None, tokenizer: Any, sequence: int
                 ) -> dict[str, np.ndarray]:
    """A static int8 target's check inputs, as the export makes them (the calibration files' last texts, not
    calibrated on: the task's own, or a share of every task's for the base), padded to the target's sequence."""
    from ..export.steps import check_texts

    enc = tokenizer(check_texts(texts, task), padding="max_length", truncation=True, max_length=sequence,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _fresh_delta(p: Any, scratch: Path) -> bytes:
    """The task's delta file as the export writes it, computed now from the adapter."""
    from ..export.steps import _delta_for, _pooling  # the export's own delta: the bytes must be the same
    from ..format.delta import write_delta

    modules, head, _ = _delta_for(p)
    path = scratch / "delta.safetensors"
    write_delta(path, modules, head, p.base_fingerprint, p.head.labels if head else None, _pooling(p, head))
    data = path.read_bytes()
    path.unlink()
    return data


# complexity: one pass over the tasks, a check per kind of evidence, each blaming its cell
def check_folder(folder: Path, *, base: str, target: Target, label: str,  # noqa: C901
                 tasks: Mapping[str, Mapping[str, Any]], threads: int, trusted: set[str],
                 scratch: Path) -> dict[str, Any]:
    """Check the assembled ``folder`` (see the module docstring). ``tasks``: name -> {"adapter", "eval",
    "calibrate", "accuracy" (what the task cell records)}; ``trusted``: names of the cells this build made.
    Returns the re-derived numbers per task and the quality misses of trusted cells; raises :class:`Suspect`
    naming every other cell that misses."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..export.calibration import read_texts
    from ..export.report import engine_size
    from ..export.steps import _read_eval
    from ..format.layout import delta_path
    from ..format.manifest import read_manifest
    from ..prepare import prepare
    from ..runtime import Runtime
    from ..verify import check_encoder, classify_accuracy, fixed_inputs, within

    t0 = time.perf_counter()
    manifest = read_manifest(folder)
    tol, static = target.tolerance, target.precision == "int8" and target.quantization.method == "static"
    blame: dict[str, list[str]] = {}
    numbers: dict[str, dict[str, Any]] = {}
    if manifest.task == "causal-lm":  # no fresh reference for decoders yet: the signature is their proof
        return {"tasks": {}, "misses": [], "seconds": round(time.perf_counter() - t0, 2),
                "skipped": "causal-lm folders are not re-derived"}
    texts = {n: read_texts(Path(t["calibrate"])) for n, t in tasks.items() if static and t.get("calibrate")}
    tokenizer: Any = None
    runtime = Runtime.open(folder, threads=threads, provider=target.provider) if manifest.swap else None
    baked_failed = 0
    for i, (name, t) in enumerate(tasks.items()):
        cell = task_cell_name(name, label)
        p = prepare(base, Path(t["adapter"]))
        if tokenizer is None:  # the build's own base, not a path read from a cell
            tokenizer = AutoTokenizer.from_pretrained(str(p.base_path))
        if _fresh_delta(p, scratch) != (folder / delta_path(name)).read_bytes():
            blame.setdefault(cell, []).append("holds a delta that differs from a fresh computation from its adapter")
        vocab, shapes = int(p.model.config.vocab_size), target.shapes
        inputs = fixed_inputs(vocab, max(2, shapes.batch), shapes.sequence)
        if i == 0:  # the base engine alone, on the unmerged model (before PEFT injects anything into it)
            base_inputs = _text_inputs(texts, None, tokenizer, shapes.sequence) if texts else inputs
            parity = check_encoder(_session(target, folder / manifest.base.engine, threads), p.model, base_inputs,
                                   True)
            miss = [m for m in within(parity, tol) if m.startswith("cosine")]
            if miss and not static:
                blame.setdefault(base_cell_name(label), []).append(f"fails the fresh PyTorch check ({miss[0]})")
        entry = manifest.tasks[name]
        if entry.engine is None or p.task != "sequence-classification":  # the engine checks compare logits
            numbers[name] = {"accuracy": None, "torch_accuracy": None, "skipped": "no classification engine"}
            continue
        model = PeftModel.from_pretrained(p.model, str(t["adapter"])).eval()
        sess = _session(target, folder / entry.engine, threads)
        task_inputs = _text_inputs(texts, name, tokenizer, shapes.sequence) if texts else inputs
        parity = check_encoder(sess, model, task_inputs, False)
        row: dict[str, Any] = {**parity.to_json(), "engine_size_bytes": engine_size(folder / entry.engine),
                               "accuracy": None, "torch_accuracy": None}
        miss = within(parity, tol)
        if miss:
            baked_failed += 1
            blame.setdefault(cell, []).append(f"fails the fresh PyTorch+PEFT check ({'; '.join(miss)})")
        if runtime is not None and entry.swappable:
            feeds = fixed_inputs(vocab, 2, min(16, shapes.sequence))
            diff = float(np.abs(runtime.run(task=name, **feeds)["logits"] - sess.run(["logits"], feeds)[0]).max())
            row["runtime_max_abs_diff"] = diff
            if diff > tol.max_abs_diff:  # the runtime is the base engine, its swap graph and the delta
                blame.setdefault(base_cell_name(label), []).append(
                    f"makes the runtime miss task {name}'s engine (max |Δ| {diff:.3g} > {tol.max_abs_diff:g})")
        if t.get("eval"):
            eval_texts, labels = _read_eval(Path(t["eval"]), p)
            acc, torch_acc = classify_accuracy(sess, model, tokenizer, eval_texts, labels)
            row["accuracy"], row["torch_accuracy"] = acc, torch_acc
            if t.get("accuracy") is not None and t["accuracy"] != acc:
                blame.setdefault(cell, []).append(f"records accuracy {t['accuracy']:.4g}, its engine measures "
                                                  f"{acc:.4g}")
        numbers[name] = row
    if baked_failed and baked_failed == sum(1 for n in tasks if manifest.tasks[n].engine):
        # every task engine reads the base engine's weights file: when all miss, the base is suspect too
        blame.setdefault(base_cell_name(label), []).append("is read by every task engine, and all of them miss")
    suspects = {c: "; ".join(why) for c, why in blame.items() if c not in trusted}
    if suspects:
        raise Suspect(suspects)
    misses = [f"{c} ({'; '.join(why)})" for c, why in blame.items()]
    return {"tasks": numbers, "misses": misses, "seconds": round(time.perf_counter() - t0, 2)}
