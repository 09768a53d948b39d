"""The ``edgelora`` command line: parse, call a library function, print.

Bad input ends in one line on stderr, ``error: <what> ; <fix>``, and exit status 2 (1 when a check
on good input fails). No traceback, nothing partial on disk.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .errors import EdgeloraError, EdgeloraWarning

_BASE_HELP = "Base model: an HF folder, a cached hub id, or omit for the bundled all-MiniLM-L6-v2."


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value) if value else "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
        elif value is None:
            value = "-"
        click.echo(f"{key.ljust(width)}  {value}")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def _steps(total: int, desc: str, quiet: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over named steps (on stderr, only on a terminal)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True,
               bar_format="{desc}: {n_fmt}/{total_fmt} {postfix}")
    started = [False]

    def step(name: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(name)

    try:
        yield step
        bar.update(1)
    finally:
        bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelora")
def cli() -> None:
    """edgelora: LoRA adapters to the edge: train or import, merge, export, swap on device."""


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--train", "train_file", required=True, type=click.Path(path_type=Path),
              help="Training data: .tsv/.csv/.jsonl (classification) or .jsonl/.txt (causal LM).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter folder to write.")
@click.option("--task", type=click.Choice(["auto", "sequence-classification", "causal-lm"]), default="auto",
              show_default=True, help="auto: causal-lm for .txt or prompt/completion JSONL, else classification.")
@click.option("--base", default=None, help=_BASE_HELP)
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), default=None,
              help="Validation file, evaluated after every epoch.")
@click.option("--val-fraction", type=float, default=None,
              help="Hold out this fraction of --train (fixed seed) for validation instead of --eval.")
@click.option("--r", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale = alpha/r).")
@click.option("--targets", default=None,
              help="Comma-separated module names to adapt (default: the family's W_q, W_v).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scale alpha/sqrt(r).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Learning rate (of A, with LoRA+).")
@click.option("--loraplus-ratio", type=float, default=None,
              help="LoRA+: B learns this many times faster than A (e.g. 16); default plain LoRA.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--warmup-ratio", type=float, default=0.06, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--attention-dropout", type=float, default=0.0, show_default=True,
              help="Dropout on the base's attention probabilities (0 enables the fused attention kernel).")
@click.option("--lean-allocator/--default-allocator", default=True, show_default=True,
              help="Return freed activation memory to the OS (about half the memory, ~20% slower steps).")
@click.option("--text-column", default=None, help="Text column (default: sentence or text).")
@click.option("--label-column", default="label", show_default=True)
@click.option("--labels", default=None, help="Comma-separated label values in class-id order (default: sorted).")
@click.option("--label-names", default=None,
              help="Comma-separated display names for the labels, in class-id order (e.g. negative,positive).")
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default=None,
              help="What the classifier reads: the [CLS] token through the pooler, or the mean of the token "
                   "states (default: the base's own; mean for sentence-transformers bases such as the bundled one).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(train_file: Path, output: Path, task: str, base: str | None, eval_file: Path | None,
          val_fraction: float | None, r: int, alpha: float, targets: str | None, dropout: float, rslora: bool,
          lr: float, loraplus_ratio: float | None, batch_size: int, epochs: int, max_steps: int | None,
          warmup_ratio: float,
          weight_decay: float, max_length: int, seed: int, threads: int | None, attention_dropout: float,
          lean_allocator: bool, text_column: str | None,
          label_column: str, labels: str | None, label_names: str | None, pooling: str | None, force: bool,
          as_json: bool, quiet: bool) -> None:
    """Train a LoRA adapter (A random, B zero, W_q/W_v by default) and write a PEFT folder."""
    from .train import TrainConfig
    from .train import train as run_train

    if task == "auto":
        task = _guess_task(train_file)
    cfg = TrainConfig(
        r=r, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
        dropout=dropout, rslora=rslora, lr=lr, loraplus_ratio=loraplus_ratio, batch_size=batch_size, epochs=epochs,
        max_steps=max_steps,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_length=max_length, seed=seed, threads=threads,
        attention_dropout=attention_dropout, lean_allocator=lean_allocator, pooling=pooling,
    )
    result = run_train(
        task, train_file, output, cfg, base=base, eval_file=eval_file, val_fraction=val_fraction,
        text_column=text_column, label_column=label_column,
        labels=[s.strip() for s in labels.split(",")] if labels else None,
        label_names=[s.strip() for s in label_names.split(",")] if label_names else None,
        force=force, command="edgelora " + shlex.join(sys.argv[1:]), progress=not quiet,
    )
    summary = {
        "output": str(result.output),
        "task": task,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "trainable_percent": round(100.0 * result.trainable_parameters / result.total_parameters, 4),
        "seconds": round(result.seconds, 1),
        **{k: v for k, v in result.final.items() if k.startswith("eval_") or k == "train_loss"},
    }
    if as_json:
        _print_json(summary)
    else:
        _print_table(list(summary.items()))


def _guess_task(train_file: Path) -> str:
    suffix = train_file.suffix.lower()
    if suffix == ".txt":
        return "causal-lm"
    if suffix == ".jsonl" and train_file.is_file():
        with open(train_file, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return "sequence-classification"  # the reader reports the bad line
        if isinstance(row, dict) and "completion" in row:
            return "causal-lm"
    return "sequence-classification"


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="PEFT adapter folder.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model folder to write.")
@click.option("--base", default=None, help=_BASE_HELP)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickled adapter_model.bin (loaded weights_only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge(adapter: Path, output: Path, base: str | None, force: bool, allow_pickle: bool, as_json: bool,
          quiet: bool) -> None:
    """Fold an adapter into the base in fp32 and write a normal HF model folder."""
    from .base import resolve_base
    from .fsutil import check_output
    from .merged_model import write_merged_model
    from .prepare import prepare

    check_output(output, force=force, inputs=[("adapter", adapter), ("base", resolve_base(base))])  # before loading
    with _steps(5, "merge", quiet) as step:
        prepared = prepare(base, adapter, allow_pickle=allow_pickle, progress=step)
        step("merging in fp32 and writing")
        write_merged_model(prepared, output, force=force)
    summary = {
        "output": str(output),
        "base": str(prepared.base_path),
        "base_fingerprint": prepared.base_fingerprint,
        "task": prepared.task,
        "architecture": type(prepared.model).__name__,
        "merged_modules": len(prepared.plan.targets),
        "replaced_parameters": sorted(prepared.plan.replacements),
        "adapter_hash": prepared.plan.adapter_hash,
    }
    if as_json:
        _print_json(summary)
    else:
        _print_table(list(summary.items()))


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--base", default=None, help="Also check the adapter against this base (shapes, fingerprint).")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickled adapter_model.bin (loaded weights_only).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, base: str | None, allow_pickle: bool, as_json: bool) -> None:
    """Show an adapter's rank, alpha, scale, targets, parameters, size and base fingerprint."""
    from .info import describe

    info = describe(path, base=base, allow_pickle=allow_pickle)
    if as_json:
        _print_json(info)
        return
    rows = list(info.items())
    rows = [(k, _human_bytes(v) + f" ({v} bytes)" if k == "size_bytes" else v) for k, v in rows]
    _print_table(rows)


# ---------------------------------------------------------------------------------------------
def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EdgeloraError(f"{flag} {v!r} must be NAME=PATH, e.g. {flag} sst2=examples/adapters/sst2")
        if name in out:
            raise EdgeloraError(f"{flag} {name} is given twice; use one NAME=PATH per task")
        out[name] = path
    return out


def _calibrate_pairs(values: tuple[str, ...]) -> dict[str, str]:
    """``--calibrate``: NAME=FILE for one task, a bare FILE ("" key) for every task not named."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep and name and "/" not in name else ("", v)
        if not path:
            raise EdgeloraError(f"--calibrate {v!r} must be FILE or NAME=FILE")
        if name in out:
            raise EdgeloraError(f"--calibrate {name or 'FILE'} is given twice; use one file per task")
        out[name] = path
    return out


@cli.command()
@click.option("--base", default=None, help=_BASE_HELP)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A task: its name and PEFT adapter folder (repeat). Default: the example adapters.")
@click.option("--target", default="cpu-fp32", show_default=True,
              help="Deployment target: a bundled name (cpu-fp32, cpu-int8, cpu-int4, cuda-fp16) or a .toml file.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Deployment folder to write (default: out/<target>).")
@click.option("--eval", "evals", multiple=True, metavar="NAME=FILE",
              help="Labelled file for task NAME: engine and PyTorch accuracy go in the report (repeat).")
@click.option("--calibrate", "calibrate", multiple=True, metavar="[NAME=]FILE",
              help="Static int8 targets: texts to calibrate on (.txt one per line, or a TSV/CSV/JSONL with a "
                   "sentence/text column); NAME=FILE for one task, FILE for every task (repeat).")
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for timing engines.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled adapter_model.bin files (loaded weights_only).")
@click.option("--keep-failed", is_flag=True,
              help="Write the folder even when an engine misses its tolerance (the exit status is still 1).")
@click.option("--bake", type=click.Choice(["auto", "reexport"]), default="auto", show_default=True,
              help="Task engines: auto patches the base engine (seconds) where it can, else exports the merged "
                   "model again; reexport always exports again (the reference patched engines are checked against).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export(base: str | None, adapters: tuple[str, ...], target: str, output: Path | None, evals: tuple[str, ...],
           calibrate: tuple[str, ...], threads: int, force: bool, allow_pickle: bool, keep_failed: bool, bake: str,
           as_json: bool, quiet: bool) -> None:
    """Export a base engine, per-task deltas and baked engines for a target, verified against PyTorch."""
    from .export import default_adapters, format_table, report_rows
    from .export import export as run_export
    from .target import load_target

    tgt = load_target(target)
    pairs: dict[str, Any] = _pairs(adapters, "--adapter") if adapters else default_adapters()
    output = output or Path("out") / tgt.name
    if threads < 1:
        raise EdgeloraError(f"--threads is {threads}; it must be ≥ 1")
    steps = 5 + 4 * len(pairs) + len(evals)
    with _steps(steps, f"export {tgt.name}", quiet) as step:
        result = run_export(base, pairs, tgt, output, evals=_pairs(evals, "--eval"), force=force,
                            allow_pickle=allow_pickle, threads=threads, progress=step, keep_failed=keep_failed,
                            bake=bake, calibrate=_calibrate_pairs(calibrate))
    if as_json:
        _print_json(result.report)
        return
    click.echo(f"wrote {output} ({tgt.name}, {result.seconds:.1f} s)")
    click.echo(format_table(report_rows(result.report)))


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for every engine and PyTorch.")
@click.option("--rounds", type=int, default=8, show_default=True, help="Interleaved rounds (10 timed runs each).")
@click.option("--no-peft", is_flag=True, help="Skip PEFT's unmerged model in PyTorch.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A task's PEFT folder, for PEFT's unmerged model (default: where the manifest says).")
@click.option("--beside", type=click.Path(path_type=Path), default=None,
              help="ExecuTorch folders: a cpu-fp32 folder of the same adapters, timed beside it (ONNX Runtime).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def bench(folder: Path, threads: int, rounds: int, no_peft: bool, adapters: tuple[str, ...], beside: Path | None,
          as_json: bool) -> None:
    """Latency of a deployment folder's engines side by side (medians, ratios to the base engine; an ExecuTorch
    folder: both program forms per task, beside ONNX Runtime fp32 with --beside)."""
    from .bench import bench as run_bench
    from .bench import bench_table

    if threads < 1 or rounds < 1:
        raise EdgeloraError("--threads and --rounds must be ≥ 1")
    result = run_bench(folder, threads=threads, rounds=rounds, peft=not no_peft, beside=beside,
                       adapters=_pairs(adapters, "--adapter"))
    if as_json:
        _print_json(result)
    else:
        click.echo(bench_table(result))


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--task", default=None, help="Task to activate (default: the first in the manifest).")
@click.option("--text", "texts", multiple=True, required=True, help="Input text (repeat for a batch).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Decoders: tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="Decoders: 0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Decoders: nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True,
              help="Decoders: sample among the k likeliest (0: all).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Decoders: divide seen tokens' positive logits by this (1: none).")
@click.option("--seed", type=int, default=None, help="Decoders: sampling seed.")
@click.option("--mode", type=click.Choice(["swap", "unmerged", "engines"]), default=None,
              help="How tasks run (default: the runtime's choice for this folder).")
@click.option("--threads", type=int, default=None, help="Engine threads (default: ONNX Runtime's).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def run(folder: Path, task: str | None, texts: tuple[str, ...], max_new_tokens: int, temperature: float,
        top_p: float, top_k: int, repetition_penalty: float, seed: int | None, mode: str | None,
        threads: int | None, as_json: bool) -> None:
    """Run a deployment folder on text with the on-device runtime: the class, or the generated text (decoders:
    streamed as it is generated, text in and text out through the folder's tokenizer)."""
    import numpy as np

    from .runtime import Runtime

    if max_new_tokens < 0:
        raise EdgeloraError(f"--max-new-tokens is {max_new_tokens}; pass the number of tokens to generate (≥ 0)")
    rt = Runtime.open(folder, threads=threads, mode=mode)
    if task is None and rt.tasks:
        task = rt.tasks[0]
    results: list[dict[str, Any]] = []
    if rt.kind == "causal-lm":
        limits = [_new_tokens(rt, text, max_new_tokens, f"--text {i + 1}: " if len(texts) > 1 else "")
                  for i, text in enumerate(texts)]  # every prompt checked before any is generated
        for text, limit in zip(texts, limits, strict=True):
            if not as_json:
                click.echo(text, nl=False)
            stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
            count: list[int] = []
            generated = rt.generate_text(text, limit, stream=stream, temperature=temperature, top_p=top_p,
                                         top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, task=task,
                                         on_token=count.append)
            if not as_json:
                click.echo("")
            results.append({"text": text, "generated": generated, "tokens": len(count)})
    elif task is None or rt.num_labels(task) is None:
        out = rt.run(text=list(texts), task=task)
        key = "pooler_output" if "pooler_output" in out else "last_hidden_state"
        for text, vec in zip(texts, out[key], strict=True):
            results.append({"text": text, "embedding_dims": list(vec.shape), "norm": float(np.linalg.norm(vec))})
    else:
        for text, (label, prob) in zip(texts, rt.classify(list(texts), task=task), strict=True):
            results.append({"text": text, "label": label, "probability": prob})
    if as_json:
        _print_json({"task": task, "mode": rt.mode, "results": results})
        return
    for r in results:
        if "generated" in r:
            continue  # streamed above
        if "label" in r:
            click.echo(f"{r['label']:>10}  {r['probability']:.3f}  {r['text']}")
        else:
            click.echo(f"{r['text']}: embedding {r['embedding_dims']}, norm {r['norm']:.3f}")


def _new_tokens(rt: Any, text: str, asked: int, which: str) -> int:
    """How many tokens ``edgelora run`` generates after ``text``: ``asked``, lowered (with a warning naming the
    option) to the positions the prompt leaves; a prompt that leaves none, or is longer than the tokenizer's
    limit, is refused, never cut."""
    try:
        length = len(rt.tokenizer.prompt(text))
    except EdgeloraError as exc:
        raise EdgeloraError(f"{which}{exc}") from None
    positions = rt.max_positions or 1 << 30
    if asked and length >= positions:
        raise EdgeloraError(f"{which}the prompt is {length} tokens and leaves none of the base's {positions} "
                            "positions for new tokens; shorten the prompt")
    if asked > positions - length:
        warnings.warn(EdgeloraWarning(f"{which}--max-new-tokens {asked} lowered to {positions - length}: the prompt "
                                      f"is {length} tokens of the base's {positions} positions"), stacklevel=2)
        return positions - length
    return asked


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--mixed/--no-mixed", default=None,
              help="Keep the LoRA-branch graph for mixed-task batches (default: where it adds no data file).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def pack(folder: Path, output: Path, mixed: bool | None, force: bool, as_json: bool) -> None:
    """Write the device bundle of a deployment folder: only what edgelora.runtime reads on the device."""
    from .export.bundle import pack as run_pack
    from .export.report import engine_size

    bundle = run_pack(folder, output, mixed=mixed, force=force)
    m = bundle.manifest
    base = engine_size(folder / m.base.engine)
    deltas = sum(e.size for f, e in m.files.items() if f in {t.delta for t in m.tasks.values()})
    summary = {"output": str(output), "files": bundle.files, "bytes": bundle.size_bytes,
               "base_engine_bytes": base, "deltas_bytes": deltas,
               "vs_base_and_deltas": round(bundle.size_bytes / (base + deltas), 4)}
    if as_json:
        _print_json(summary)
    else:
        click.echo(f"wrote {output}: {len(bundle.files) + 1} files, {_human_bytes(bundle.size_bytes)} "
                   f"({summary['vs_base_and_deltas']:.3f}x the base engine + deltas, "
                   f"{_human_bytes(base + deltas)})")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--conformance", is_flag=True,
              help="Also re-run the folder's reference vectors on this machine: each task vs PyTorch's outputs "
                   "under the target's tolerances, A->B->A exactness, each task changes the outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def verify(folder: Path, conformance: bool, as_json: bool) -> None:
    """Check a deployment folder as the runtime would, and more: every file's size and sha256 against the
    manifest, every field of the manifest, every delta, W0 and the engines' loading; with --conformance, what
    this machine computes against the reference vectors the folder carries (exit 1 when a check fails)."""
    from .errors import DeploymentError
    from .runtime import Runtime

    t0 = time.perf_counter()
    rt = Runtime.open(folder, verify=True, threads=1)
    from .runtime.cpu import measured_int8_path

    int8 = measured_int8_path()  # int8 results depend on it: AVX2 without VNNI saturates full-range weights
    summary = {"folder": str(folder), "format": rt.manifest.format, "files": len(rt.manifest.files),
               "bytes": sum(e.size for e in rt.manifest.files.values()), "tasks": rt.tasks, "mode": rt.mode,
               "int8_path": {"kernel": int8.kernel, "saturates": int8.measured if int8.measured is not None
                             else int8.saturates},
               "seconds": round(time.perf_counter() - t0, 2)}
    test = rt.self_test() if conformance else None
    if test is not None and test.unavailable is not None:
        raise DeploymentError(test.unavailable)
    if as_json:
        _print_json({"ok": test is None or test.ok, **summary,
                     **({"conformance": test.to_json()} if test is not None else {})})
    else:
        click.echo(f"ok: {folder}: {summary['files']} files ({_human_bytes(summary['bytes'])}) match the manifest, "
                   f"{len(rt.tasks)} task(s) valid ({summary['seconds']} s)")
        click.echo(f"  {int8.line()}")
        for check in test.checks if test is not None else ():
            click.echo(f"  {check.line()}")
        if test is not None and test.ok:
            click.echo(test.summary())
    if test is not None and not test.ok:
        raise EdgeloraError(test.summary(), exit_code=1)


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--jobs", "-j", type=int, default=1, show_default=True, help="Cells built at once (worker processes).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Who runs the cells: local worker processes, or Ray tasks (pip install 'edgelora[ray]').")
@click.option("--ray-address", default=None, help="Ray cluster to run on (default: start a local one).")
@click.option("--force", is_flag=True, help="Rebuild every cell, cached or not.")
@click.option("--only", default=None, metavar="TASK/TARGET",
              help="Build one cell and what it reads (the trained adapters, the target's base stage); no folder.")
@click.option("--prepare", is_flag=True, help="Build only what every cell shares: trained adapters, base stages.")
@click.option("--emit-matrix", is_flag=True, help="Print the cells as a CI job matrix (JSON) and exit.")
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="Cache folder (default: the file's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where the deployment folders and report go (default: the file's output).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def build(pipeline: Path, jobs: int, executor: str, ray_address: str | None, force: bool, only: str | None,
          prepare: bool, emit_matrix: bool, cache: Path | None, output: Path | None, as_json: bool,
          quiet: bool) -> None:
    """Build every task x target of PIPELINE.toml: engines, a deployment folder and device bundle per target,
    report.md / report.json / charts. Unchanged cells come from the cache. Exit 1 when a gate fails."""
    from .pipeline import Build
    from .pipeline import emit_matrix as matrix
    from .pipeline.report import table

    if emit_matrix:
        _print_json(matrix(pipeline))
        return
    result = Build(pipeline, jobs=jobs, executor=executor, ray_address=ray_address, force=force, only=only,
                   prepare=prepare, quiet=quiet or as_json, cache=cache, output=output).run()
    if as_json:
        _print_json(result.report)
    else:
        click.echo(table(result.report))
        if result.report.get("charts"):
            click.echo(f"report: {result.pipeline.output / 'report.md'}")
    for note in result.report["cache"]:  # cache cells that were not what they claimed, and were rebuilt
        click.echo(note, err=True)
    errors = {f"{e['cell']}: {e['error']}" for e in result.report["errors"]}
    for f in result.failures[:20]:
        click.echo(f"{'error' if f in errors else 'gate failed'}: {f}", err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


# ---------------------------------------------------------------------------------------------
def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit status 2 on bad input, no tracebacks."""
    warnings.simplefilter("ignore")  # library chatter (peft/transformers/torch) is not for CLI users
    warnings.simplefilter("always", EdgeloraWarning)
    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="edgelora", standalone_mode=False)
    except EdgeloraError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "edgelora"
        click.echo(f"error: {exc.format_message()} (see '{cmd} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
