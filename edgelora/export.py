"""``edgelora export``: one base engine, a delta per task, baked per-task engines, a verified report.

Order of work (every check runs before the first file is written):

1. read the target; load and validate every adapter against the base (fingerprint, names, shapes);
2. base engine: export the unmerged base to ONNX (fp32), fuse where it pays, build the name map
   (LoRA target -> initializer, by content), then quantize / cast for the target;
3. per task: merge in fp32, export, fuse, quantize -> baked engine; verify it against the PyTorch
   merged model (and on ``--eval`` data); write the delta (A, B, scale + head) for on-device swaps;
4. measure latency, write manifest.json, report.json and report.md, and rename the folder into
   place. A task outside its tolerance fails the export (exit 1) and leaves nothing behind.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .adapter import load_adapter
from .base import DEFAULT_BASE_NAME, bundled_base_path, read_config
from .deploy import (
    BASE_DATA,
    BASE_ENGINE,
    FORMAT_VERSION,
    LORA_DATA,
    LORA_ENGINE,
    MANIFEST,
    REPORT_JSON,
    REPORT_MD,
    SWAP_ENGINE,
    SWAP_W0,
    TOKENIZER_DIR,
    DeltaModule,
    delta_path,
    ort_adapter_path,
    save_float32_safetensors,
    task_engine_path,
    write_delta,
    write_json,
)
from .errors import EdgeloraError
from .format.files import file_table
from .format.location import WeightLocation
from .format.manifest import TASK_NAME
from .fsutil import WORK_DIR, atomic_output_dir, check_output_dir, scratch_dir
from .merge import merge_into_model
from .merged_model import copy_tokenizer
from .prepare import Prepared, prepare
from .target import Target

EXAMPLE_ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "examples" / "adapters"


class ExportFailed(EdgeloraError):
    """An engine missed its target's tolerance (exit status 1, not a usage error)."""

    exit_code = 1


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any]
    seconds: float
    failures: list[str] = field(default_factory=list)


def engine_size(path: Path) -> int:
    """Bytes of a file plus its external-data file (``model.onnx`` + ``model.onnx.data``)."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def _w0_out_in(model: Any, key: str, fan_in_fan_out: bool) -> np.ndarray:
    w = model.state_dict()[key].detach().to("cpu").float().numpy()
    return np.ascontiguousarray(w.T if fan_in_fan_out else w)


def _build_engine(model: Any, task: str, headless: bool, target: Target, work: Path, stem: str,
                  family: str) -> tuple[Path, Path, dict[str, Any], bool]:
    """torch -> fp32 ONNX -> fused -> (quantized). Returns (final, fp32 graph, spec, fused)."""
    from .converters.onnx import export as onnx_export
    from .converters.onnx import optimize as onnx_optimize
    from .converters.onnx import quantize as onnx_quantize

    raw = work / f"{stem}.raw.onnx"
    spec = onnx_export.export_for_task(model, task, raw, target.opset, headless=headless).to_json()
    fp32 = raw
    fused = False
    if target.optimize:
        opt = work / f"{stem}.opt.onnx"
        fused = onnx_optimize.optimize(raw, opt, family, model.config)
        if fused:
            fp32 = opt
    final = fp32
    if target.precision != "fp32":
        final = work / f"{stem}.{target.precision}.onnx"
        # a classification head stays fp32: a few KB, and the runtime applies it in fp32 beside the base
        exclude = onnx_quantize.head_nodes(fp32) if task == "sequence-classification" else ()
        onnx_quantize.quantize(fp32, final, target, exclude)
    return final, fp32, spec, fused


def _delta_for(p: Prepared) -> tuple[dict[str, DeltaModule], dict[str, np.ndarray], str | None]:
    """(modules, head tensors, reason it cannot be swapped on a device or None).

    Embedding LoRA needs no special case: PEFT stores A (r, num), B (dim, r) and ΔW (num, dim) = (B·A)ᵀ,
    which in the name map's (out, in) convention (out = dim) is B·A, as for a linear layer.
    """
    modules: dict[str, DeltaModule] = {}
    reason = None
    for t in p.plan.targets:
        lora = t.lora
        if lora.magnitude is not None:
            reason = f"{t.module} uses DoRA (not a pure W0 + s·B·A update); use the baked engine"
        if lora.bias is not None:
            reason = f"{t.module} has a LoRA bias (lora_bias); use the baked engine"
        modules[t.module] = DeltaModule(t.module, lora.A.float().numpy(), lora.B.float().numpy(), float(lora.scale))
    head = {k: v.detach().float().numpy() for k, v in p.plan.replacements.items()}
    return modules, head, reason


def default_adapters() -> dict[str, Path]:
    """The example adapters shipped in the repository (the no-argument export)."""
    found = {p.name: p for p in sorted(EXAMPLE_ADAPTERS_DIR.glob("*")) if (p / "adapter_config.json").is_file()}
    if not found:
        raise EdgeloraError(f"no example adapters in {EXAMPLE_ADAPTERS_DIR}; pass --adapter NAME=PATH")
    return found


def export(
    base: str | os.PathLike[str] | None,
    adapters: Mapping[str, str | os.PathLike[str]],
    target: Target,
    output: str | os.PathLike[str],
    *,
    evals: Mapping[str, str | os.PathLike[str]] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
    latency_runs: int = 30,
    keep_failed: bool = False,
) -> ExportResult:
    report_step = progress or (lambda step: None)
    t_start = time.perf_counter()
    output = Path(output)
    evals = dict(evals or {})
    check_output_dir(output.absolute(), force)
    if not adapters:
        raise EdgeloraError("no adapters given; pass --adapter NAME=PATH (one or more)")
    for name in adapters:
        if not TASK_NAME.fullmatch(name) or name == "base":
            raise EdgeloraError(f"task name {name!r} is not usable as a folder name; use letters, digits, . _ - "
                                "(up to 128, not starting with . _ -)")
    for name in evals:
        if name not in adapters:
            raise EdgeloraError(f"--eval {name}=...: no adapter named {name!r}; names: {', '.join(adapters)}")
        if not Path(evals[name]).is_file():
            raise EdgeloraError(f"--eval {name}: file {evals[name]} does not exist; pass a labelled TSV/CSV/JSONL")
    if target.provider == "CUDAExecutionProvider":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EdgeloraError(f"target {target.name} needs CUDAExecutionProvider; install edgelora[gpu] on a "
                                "machine with an NVIDIA GPU, or choose a cpu-* target")

    # 1. every adapter read and checked against the base before any work
    prepared: dict[str, Prepared] = {}
    for name, path in adapters.items():
        report_step(f"checking adapter {name}")
        prepared[name] = prepare(base, load_adapter(path, allow_pickle=allow_pickle))
    tasks = {p.task for p in prepared.values()}
    if len(tasks) > 1:
        raise EdgeloraError("adapters are for different tasks (" + ", ".join(
            f"{n}: {p.task}" for n, p in prepared.items()) + "); export one task type per deployment")
    task = tasks.pop()
    if task not in ("sequence-classification", "feature-extraction", "causal-lm"):
        raise EdgeloraError(f"export of {task} adapters is not supported yet; supported: sequence-classification, "
                            "feature-extraction, causal-lm")
    first = next(iter(prepared.values()))
    base_path, base_fp = first.base_path, first.base_fingerprint
    config = read_config(base_path)
    family = str(config.get("model_type", ""))
    eval_sets = {name: _read_eval(Path(f), prepared[name]) for name, f in evals.items()}

    import onnx

    from .converters.onnx.names import NameMapError, build_name_map, float_initializers

    headless = task != "causal-lm"  # encoders: the base engine is the encoder; heads travel with tasks
    tol = target.tolerance
    failures: list[str] = []
    tokenizer = _tokenizer(base_path) if eval_sets else None
    with atomic_output_dir(output, force=force) as out, scratch_dir(out) as work:
        # 2. base engine and name map
        report_step("exporting base engine")
        base_model = first.model  # not merged yet: W0 everywhere
        final, fp32_graph, spec, fused = _build_engine(base_model, task, headless, target, work, "base", family)
        report_step("mapping LoRA targets to ONNX initializers")
        w0 = {}
        for p in prepared.values():
            for t in p.plan.targets:
                w0.setdefault(t.module, _w0_out_in(base_model, t.weight_key, t.fan_in_fan_out))
        fp32_proto = onnx.load(str(fp32_graph))
        try:
            name_map = build_name_map(fp32_proto, w0)
        except NameMapError as exc:
            raise EdgeloraError(str(exc)) from None
        (out / "base").mkdir()
        onnx.save(onnx.load(str(final)), str(out / BASE_ENGINE), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=BASE_DATA, size_threshold=1024)
        fused_inits = {k: v for k, v in float_initializers(fp32_proto).items()
                       if k in {loc.initializer for loc in name_map.values()}}
        del fp32_proto
        report_step("verifying base engine")
        base_parity, base_latency = _verify_and_time(out / BASE_ENGINE, base_model, spec, target, headless, threads,
                                                     latency_runs)
        # A headless encoder's outputs are hidden states: their scale is the model's, and an argmax
        # over hidden units means nothing, so only the cosine is held to the tolerance there.
        base_miss = _within(base_parity, tol) if not headless else [
            m for m in _within(base_parity, tol) if m.startswith("cosine")]
        if base_miss:
            failures.append(f"base: {'; '.join(base_miss)}")
        lora_graph = _lora_graph(work, out, w0, target) if target.lora_graph else None
        report_step("writing the swap graph for the on-device runtime")
        swap, swap_reason = _swap_graph(out, work, target, fused_inits, name_map, lora_graph)
        # merge each weight in the layout the swap graph feeds it: a swap then rebuilds it bit for bit
        layouts = {m: WeightLocation.from_json(loc).layout for m, loc in (swap or {}).get("modules", {}).items()}
        plain_latency = None
        if fused and target.precision == "fp32":
            plain_latency = _latency_only(work / "base.raw.onnx", spec, target, base_model, threads, latency_runs)

        # 3. tasks
        task_reports: dict[str, Any] = {}
        manifest_tasks: dict[str, Any] = {}
        for name, p in prepared.items():
            report_step(f"task {name}: delta")
            modules, head, not_swappable = _delta_for(p)
            write_delta(out / delta_path(name), modules, head, base_fp, p.head.labels if head else None)
            if lora_graph is not None and not_swappable is None:
                _write_ort_adapter(out / ort_adapter_path(name), modules, lora_graph)
            entry: dict[str, Any] = {
                "adapter_hash": p.plan.adapter_hash,
                "adapter_path": str(Path(p.adapter.source).resolve()) if p.adapter.source else None,
                "labels": list(p.head.labels) if p.head.labels else None,
                "num_labels": p.head.num_labels,
                "rank": max((t.lora.rank for t in p.plan.targets), default=0),
                "scale": sorted({t.lora.scale for t in p.plan.targets}),
                "targets": sorted({t.module.rsplit(".", 1)[-1] for t in p.plan.targets}),
                "modules": {t.module: {"rank": t.lora.rank, "scale": t.lora.scale} for t in p.plan.targets},
                "head": sorted(head),
                "delta": delta_path(name),
                "ort_adapter": ort_adapter_path(name) if (out / ort_adapter_path(name)).exists() else None,
                "swappable": not_swappable is None,
                "not_swappable_reason": not_swappable,
                "engine": None,
            }
            rep: dict[str, Any] = {"accuracy": None, "torch_accuracy": None, "max_abs_diff": None, "cosine": None,
                                   "agreement": None, "latency_ms": None, "engine_size_bytes": None,
                                   "delta_size_bytes": engine_size(out / delta_path(name))}
            if lora_graph is not None and not_swappable is None:  # DoRA / LoRA bias: baked engine only
                report_step(f"task {name}: unmerged (LoRA branches) check")
                merge_into_model(p.model, p.plan, layouts)
                parity = _verify_lora_graph(out, lora_graph, modules, p.model, spec, target, headless, threads)
                rep["unmerged_max_abs_diff"], rep["unmerged_cosine"] = parity.max_abs_diff, parity.cosine
                miss = [m for m in _within(parity, tol) if not headless or m.startswith("cosine")]
                if miss:
                    failures.append(f"{name} (LoRA branches): {'; '.join(miss)}")
            if target.bake_task_engines:
                report_step(f"task {name}: merge + engine")
                merge_into_model(p.model, p.plan, layouts)
                engine, _, task_spec, _ = _build_engine(p.model, task, False, target, work, f"task-{name}", family)
                (out / task_engine_path(name)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(engine, out / task_engine_path(name))
                entry["engine"] = task_engine_path(name)
                entry["engine_io"] = task_spec
                report_step(f"task {name}: verify")
                parity, lat = _verify_and_time(out / task_engine_path(name), p.model, task_spec, target, False,
                                               threads, latency_runs)
                rep.update(parity.to_json())
                rep["latency_ms"] = lat["median_ms"]
                rep["engine_size_bytes"] = engine_size(out / task_engine_path(name))
                miss = _within(parity, tol)
                if name in eval_sets:
                    report_step(f"task {name}: accuracy on {Path(evals[name]).name}")
                    from .verify import classify_accuracy, session

                    texts, labels = eval_sets[name]
                    acc, torch_acc = classify_accuracy(session(out / task_engine_path(name), target.provider,
                                                               threads), p.model, tokenizer, texts, labels)
                    rep["accuracy"], rep["torch_accuracy"] = acc, torch_acc
                    drop = (torch_acc - acc) * 100
                    if drop > tol.max_accuracy_drop:
                        miss.append(f"accuracy {acc:.2%} vs PyTorch {torch_acc:.2%} "
                                    f"(drop {drop:.2f} > {tol.max_accuracy_drop:g} points)")
                if miss:
                    failures.append(f"{name}: {'; '.join(miss)}")
            manifest_tasks[name] = entry
            task_reports[name] = rep

        report_step("writing manifest and report")
        (out / TOKENIZER_DIR).mkdir()
        copy_tokenizer(base_path, out / TOKENIZER_DIR)
        base_name = DEFAULT_BASE_NAME if base_path == bundled_base_path() else str(Path(base_path).resolve())
        manifest = {
            "format": FORMAT_VERSION,
            "edgelora_version": __version__,
            "task": task,
            "base": {"name": base_name, "fingerprint": base_fp, "model_type": family, "engine": BASE_ENGINE,
                     "io": spec, "headless": headless, "fused": fused,
                     "vocab_size": int(base_model.config.vocab_size),
                     # the longest sequence the position embeddings cover; the width a task head reads
                     "max_positions": _config_int(base_model.config, "max_position_embeddings", "n_positions",
                                                  "n_ctx"),
                     "hidden_size": _config_int(base_model.config, "hidden_size", "n_embd", "d_model")},
            "target": target.to_json(),
            "tokenizer": TOKENIZER_DIR if any((out / TOKENIZER_DIR).iterdir()) else None,
            "name_map": {"graph": "fused fp32" if fused else "fp32",
                         "modules": {m: loc.to_json() for m, loc in sorted(name_map.items())}},
            "lora_graph": lora_graph,
            "swap": swap,
            "swap_unavailable": swap_reason,
            "tasks": manifest_tasks,
            # size and sha256 of every file the folder holds, reports (written after) excepted: the runtime
            # checks what it reads against them, `edgelora verify` checks all of them
            "files": {rel: e.to_json() for rel, e in file_table(out, exclude_dirs=frozenset({WORK_DIR})).items()},
        }
        seconds = time.perf_counter() - t_start
        report = {
            "target": target.name,
            "precision": target.precision,
            "base": {"fingerprint": base_fp, "size_bytes": engine_size(out / BASE_ENGINE),
                     "latency_ms": base_latency["median_ms"], **base_parity.to_json(),
                     **({"agreement": None} if headless else {}),
                     "unfused_latency_ms": plain_latency["median_ms"] if plain_latency else None},
            "tasks": task_reports,
            "export_seconds": round(seconds, 1),
            "machine": {"threads": threads, "cpu": platform.processor() or platform.machine()},
        }
        write_json(out / MANIFEST, manifest)
        if swap is not None or lora_graph is not None:
            report_step("checking the on-device runtime against the baked engines")
            for name, diff in _check_runtime(out, manifest, target, threads).items():
                task_reports[name]["runtime_max_abs_diff"] = diff
                # a swap rebuilds the baked engine's weights, so it is held to the tolerance; unmerged
                # (int4: LoRA beside a quantized W0) is a different approximation and is reported only
                if swap is not None and diff > tol.max_abs_diff:
                    failures.append(f"{name} (runtime swap): max |Δ| {diff:.3g} "
                                    f"vs the baked engine > {tol.max_abs_diff:g}")
        write_json(out / REPORT_JSON, report)
        (out / REPORT_MD).write_text(report_markdown(report), encoding="utf-8")
        report["failures"] = failures
        write_json(out / REPORT_JSON, report)
        if failures and not keep_failed:
            raise ExportFailed(_failure_message(target, failures))
    if failures:  # kept on request: the folder is there to inspect, the status still says it failed
        raise ExportFailed(_failure_message(target, failures) + f" (kept in {output})")
    return ExportResult(output, report, time.perf_counter() - t_start, failures)


def _swap_graph(out: Path, work: Path, target: Target, fused_inits: Mapping[str, np.ndarray],
                name_map: Mapping[str, Any], lora_graph: Mapping[str, Any] | None
                ) -> tuple[dict[str, Any] | None, str | None]:
    """base/swap.onnx + base/swap_w0.safetensors, or (None, why) when the base's encoding of a target
    weight cannot be rebuilt on the device (then tasks run unmerged on base/lora.onnx).

    Which graph: fp32 targets swap on the unfused graph (base/lora.onnx without its branches, sharing its
    data file): each LoRA target is its own contiguous (in, out) weight, so a swap rewrites only those
    bytes in contiguous passes (W1: 7 MB in ~2 ms, where the q/k/v-packed fused weights need ~3 ms), and
    fp32 fusion measured within noise of the unfused graph. Quantized and fp16 targets swap on the base
    engine itself (int8: QAttention is 1.08x faster than the unfused int8 graph)."""
    import onnx

    from .converters.onnx.lora import remove_lora_branches
    from .converters.onnx.names import float_initializers
    from .converters.onnx.swap import make_swap_graph

    if not name_map:
        return None, "no LoRA targets"
    if target.precision == "fp32" and lora_graph is not None:
        locations = {m: WeightLocation.from_json(d) for m, d in lora_graph["modules"].items()}
        raw = onnx.load(str(work / "base.raw.onnx"))
        wanted = {loc.initializer for loc in locations.values()}
        fp32 = {k: v for k, v in float_initializers(raw).items() if k in wanted}
        del raw
        unfused = out / "base" / "unfused.onnx"
        model = onnx.load(str(out / LORA_ENGINE), load_external_data=False)
        remove_lora_branches(model)
        onnx.save(model, str(unfused))  # its tensors still point into lora.onnx.data
        try:
            swap, reason = make_swap_graph(unfused, out / SWAP_ENGINE, fp32, locations, out_in=True)
        finally:
            unfused.unlink()
        graph = "unfused"
    else:
        locations = dict(name_map)
        fp32 = dict(fused_inits)
        swap, reason = make_swap_graph(out / BASE_ENGINE, out / SWAP_ENGINE, fp32, locations)
        graph = "base engine"
    if swap is None:
        return None, reason
    save_float32_safetensors(swap.w0, out / SWAP_W0, {"format": str(FORMAT_VERSION)})
    return {"engine": SWAP_ENGINE, "w0": SWAP_W0, "graph": graph,
            "modules": {m: loc.to_json() for m, loc in sorted(swap.locations.items())}, "weights": swap.weights}, None


def _check_runtime(out: Path, manifest: Mapping[str, Any], target: Target, threads: int) -> dict[str, float]:
    """What the device will compute: ``edgelora.runtime`` on this folder, each task activated (weights
    rebuilt, or fed as branches), vs the task's baked engine on fixed inputs: max |Δ| of the logits."""
    from .runtime import Runtime
    from .verify import fixed_inputs, session

    rt = Runtime.open(out, threads=threads, provider=target.provider)
    inputs = fixed_inputs(int(manifest["base"]["vocab_size"]), 2, min(16, target.shapes.sequence))
    if rt.kind == "causal-lm":
        inputs["attention_mask"] = np.ones_like(inputs["attention_mask"])  # left-aligned rows, no padding
    diffs = {}
    for name, entry in manifest["tasks"].items():
        if not entry.get("engine") or not entry.get("swappable", True):
            continue
        rt.activate(name)
        got = rt.run(**inputs)["logits"]
        sess = session(out / entry["engine"], target.provider, threads)
        feeds = dict(inputs)
        io = entry["engine_io"]
        if io["kind"] == "causal-lm":
            feeds |= {n: np.zeros((2, io["num_kv_heads"], 0, io["head_dim"]), np.float32)
                      for n in io["inputs"] if n.startswith("past_key_values.")}
        ref = sess.run(["logits"], feeds)[0]
        diffs[name] = float(np.abs(got - ref).max())
    return diffs


def _write_ort_adapter(path: Path, modules: Mapping[str, DeltaModule], lora_graph: Mapping[str, Any]) -> None:
    """The task as ONNX Runtime adapter parameters (``onnxruntime.AdapterFormat``) for base/lora.onnx:
    ``RunOptions.add_active_adapter(LoraAdapter)`` then feeds them without the caller passing A, B."""
    import onnxruntime as ort

    from .converters.onnx.lora import in_out
    from .lora import stacked_feeds

    dims = {m: in_out(WeightLocation.from_json(d)) for m, d in lora_graph["modules"].items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(FORMAT_VERSION)
    fmt.set_model_version(FORMAT_VERSION)
    feeds = stacked_feeds([modules], dims)  # kept alive: the OrtValues borrow these arrays' memory
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))


def _failure_message(target: Target, failures: list[str]) -> str:
    return (f"export to {target.name} failed verification: " + " | ".join(failures)
            + f"; tolerances are in {target.source}")


def _lora_graph(work: Path, out: Path, w0: Mapping[str, np.ndarray], target: Target) -> dict[str, Any]:
    """base/lora.onnx: the unfused base export with LoRA branches (A, B as inputs), target precision."""
    import onnx

    from .converters.onnx import quantize as onnx_quantize
    from .converters.onnx.lora import add_lora_branches, add_lora_defaults
    from .converters.onnx.names import NameMapError, build_name_map

    graph = onnx.load(str(work / "base.raw.onnx"))
    try:
        locations = build_name_map(graph, w0)
        inputs = add_lora_branches(graph, locations)
    except NameMapError as exc:
        raise EdgeloraError(str(exc)) from None
    fp32 = work / "base.lora.onnx"
    onnx.save(graph, str(fp32))
    final = fp32
    if target.precision != "fp32":  # the branches read graph inputs, so they stay fp32
        final = work / f"base.lora.{target.precision}.onnx"
        onnx_quantize.quantize(fp32, final, target)
    graph = onnx.load(str(final))
    add_lora_defaults(graph)
    onnx.save(graph, str(out / LORA_ENGINE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=LORA_DATA, size_threshold=1024)
    return {"engine": LORA_ENGINE, "inputs": {m: list(v) for m, v in sorted(inputs.items())},
            "modules": {m: loc.to_json() for m, loc in sorted(locations.items())}}


def _verify_lora_graph(out: Path, lora_graph: Mapping[str, Any], modules: Mapping[str, DeltaModule], model: Any,
                       spec: dict[str, Any], target: Target, headless: bool, threads: int) -> Any:
    from .converters.onnx.lora import branch_feeds
    from .verify import check_causal_lm, check_encoder, fixed_inputs, session

    sess = session(out / lora_graph["engine"], target.provider, threads)
    locations = {m: WeightLocation.from_json(d) for m, d in lora_graph["modules"].items()}
    extra = branch_feeds(modules, {m: tuple(v) for m, v in lora_graph["inputs"].items()}, locations)
    inputs = fixed_inputs(int(model.config.vocab_size), max(2, target.shapes.batch), target.shapes.sequence)
    if spec["kind"] == "causal-lm":
        return check_causal_lm(sess, model, spec, inputs, extra)
    return check_encoder(sess, model, inputs, headless, extra)


def _config_int(config: Any, *keys: str) -> int | None:
    """The first positive integer among a transformers config's ``keys`` (families name the same fact
    differently: ``max_position_embeddings`` / ``n_positions``, ``hidden_size`` / ``n_embd``), else None."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _within(parity: Any, tol: Any) -> list[str]:
    from .verify import within

    return within(parity, tol)


def _tokenizer(base_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_path))


def _read_eval(path: Path, p: Prepared) -> tuple[list[str], list[int]]:
    from .data import read_classification

    if p.task != "sequence-classification":
        raise EdgeloraError(f"--eval {path}: accuracy is measured for classification adapters only")
    labels = p.head.labels
    if not labels:
        raise EdgeloraError(f"--eval {path}: the adapter has no label names (edgelora.json); re-train it with "
                            "edgelora train or evaluate with the adapter's own tooling")
    examples = read_classification(path)
    texts, raw = [e.text for e in examples], [e.label for e in examples]
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for n, x in enumerate(raw, 1):
        label = index.get(x)
        if label is None and x.lstrip("-").isdigit() and 0 <= int(x) < len(labels):
            label = int(x)
        if label is None:
            raise EdgeloraError(f"--eval {path}: example {n} has label {x!r}, which is neither one of the adapter's "
                                f"labels ({', '.join(labels)}) nor a class id 0..{len(labels) - 1}; fix the file or "
                                "pass the eval file of this task")
        ids.append(label)
    return texts, ids


def _verify_and_time(path: Path, model: Any, spec: dict[str, Any], target: Target, headless: bool, threads: int,
                     runs: int) -> tuple[Any, dict[str, float]]:
    from .latency import latency_inputs, session_latency
    from .verify import check_causal_lm, check_encoder, fixed_inputs, session

    sess = session(path, target.provider, threads)
    vocab = int(model.config.vocab_size)
    batch = max(2, target.shapes.batch)  # two rows: one of them padded
    inputs = fixed_inputs(vocab, batch, target.shapes.sequence)
    parity = check_causal_lm(sess, model, spec, inputs) if spec["kind"] == "causal-lm" else \
        check_encoder(sess, model, inputs, headless)
    feeds = latency_inputs(sess, spec, target.shapes.batch, target.shapes.sequence, vocab)
    return parity, session_latency(sess, feeds, runs=runs)


def _latency_only(path: Path, spec: dict[str, Any], target: Target, model: Any, threads: int, runs: int
                  ) -> dict[str, float]:
    from .latency import latency_inputs, session_latency
    from .verify import session

    sess = session(path, target.provider, threads)
    feeds = latency_inputs(sess, spec, target.shapes.batch, target.shapes.sequence, int(model.config.vocab_size))
    return session_latency(sess, feeds, runs=runs)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report_rows(report: Mapping[str, Any]) -> list[list[str]]:
    b = report["base"]
    rows = [["engine", "accuracy (torch)", "max |Δ|", "cosine", "agreement", "latency", "engine size", "delta size"],
            ["base", "-", _fmt(b.get("max_abs_diff"), ".2e"), _fmt(b.get("cosine"), ".6f"),
             _fmt(b.get("agreement"), ".3f"), f"{b['latency_ms']:.2f} ms", _mb(b["size_bytes"]), "-"]]
    for name, t in report["tasks"].items():
        acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.2%} ({t['torch_accuracy']:.2%})"
        rows.append([name, acc, _fmt(t["max_abs_diff"], ".2e"), _fmt(t["cosine"], ".6f"),
                     _fmt(t["agreement"], ".3f"), "-" if t["latency_ms"] is None else f"{t['latency_ms']:.2f} ms",
                     _mb(t["engine_size_bytes"]), _mb(t["delta_size_bytes"])])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def report_markdown(report: Mapping[str, Any]) -> str:
    rows = report_rows(report)
    lines = [f"# edgelora export report: {report['target']} ({report['precision']})", "",
             f"Base fingerprint `{report['base']['fingerprint']}`. Latency: median after warm-up, "
             f"{report['machine']['threads']} threads. Export took {report['export_seconds']} s.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if report["base"].get("unfused_latency_ms"):
        lines += ["", f"Unfused fp32 base engine: {report['base']['unfused_latency_ms']:.2f} ms "
                      f"(fusion gain {report['base']['unfused_latency_ms'] / report['base']['latency_ms']:.2f}x)."]
    return "\n".join(lines) + "\n"
