"""The steps of ``edgelora export``, in order, each a short function over the :class:`ExportContext`.

1. :func:`check_request`   names, eval files, the provider — before anything is loaded
2. :func:`read_adapters`   every adapter read and checked against the base (:func:`read_calibration`: the
                           texts a static int8 target calibrates on)
3. :func:`build_base`      the base engine, its name map (LoRA target -> initializer), verified against PyTorch
4. :func:`build_runtime_graphs`  the LoRA-branch graph and the swap graph the on-device runtime runs
5. :func:`plan_baking`     whether task engines can be baked by patching the base engine (seconds) or must
                           be re-exported from the merged model (the fallback, with its reason in the report)
6. :func:`export_tasks`    per task: delta (+ ONNX Runtime adapter), branch check, baked engine, its checks
7. :func:`convert_mobile`  mobile-* targets: the engines as ONNX Runtime Mobile ORT-format models + the operator
                           config of a minimal build, each ``.ort`` checked against its ``.onnx`` bit for bit
8. :func:`write_manifest`  tokenizer, manifest with the size and sha256 of every file
9. :func:`check_runtime`   the on-device runtime on this folder vs each baked engine (mobile: on the .ort models,
                           and equal to the runtime on the .onnx ones)
10. :func:`write_report`   report.json / report.md

The engine work is the backend's (``ctx.backend``, chosen by the target's ``backend`` from the registry in
``edgelora.converters``); the steps hold the checks against PyTorch, which are the same for every backend.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..adapter import load_adapter
from ..base import DEFAULT_BASE_NAME, bundled_base_path, read_config
from ..errors import EdgeloraError
from ..format.conformance import CONFORMANCE_FILE, Reference, reference_tensors, save_tensors
from ..format.delta import write_delta
from ..format.files import file_table
from ..format.layout import (
    MANIFEST,
    REPORT_JSON,
    REPORT_MD,
    TOKENIZER_DIR,
    adapter_record,
    delta_path,
    ort_adapter_path,
    task_engine_path,
    write_json,
)
from ..format.manifest import (
    FORMAT_VERSION,
    TASK_NAME,
    BaseInfo,
    ConformanceSpec,
    ConformanceTask,
    ConformanceTolerance,
    DeviceProviderSpec,
    EngineIO,
    Manifest,
    MobileSpec,
    ModuleInfo,
    TargetInfo,
    TaskEntry,
)
from ..fsutil import WORK_DIR
from ..lora import DeltaModule, stacked_feeds
from ..merge import merge_into_model, merged_adapter, unmerge
from ..merged_model import copy_tokenizer
from ..prepare import Prepared, prepare
from ..verify import Parity, within
from .calibration import build_calibration, calibration_files, read_texts
from .context import BaseResult, ExportContext, TaskResult
from .report import engine_size, report_markdown

TASKS = ("sequence-classification", "feature-extraction", "causal-lm")


# ---------------------------------------------------------------------------------------------- before any work
def check_request(ctx: ExportContext) -> None:
    if not ctx.adapters:
        raise EdgeloraError("no adapters given; pass --adapter NAME=PATH (one or more)")
    for name in ctx.adapters:
        if not TASK_NAME.fullmatch(name) or name == "base":
            raise EdgeloraError(f"task name {name!r} is not usable as a folder name; use letters, digits, . _ - "
                                "(up to 128, not starting with . _ -)")
    for name, path in ctx.evals.items():
        if name not in ctx.adapters:
            raise EdgeloraError(f"--eval {name}=...: no adapter named {name!r}; names: {', '.join(ctx.adapters)}")
        if not Path(path).is_file():
            raise EdgeloraError(f"--eval {name}: file {path} does not exist; pass a labelled TSV/CSV/JSONL")
    unavailable = getattr(ctx.backend, "unavailable", None)
    why = unavailable() if unavailable is not None else None
    if why is not None:
        raise EdgeloraError(f"target {ctx.target.name} (backend {ctx.backend.name}) cannot export here: {why}")
    if ctx.target.provider == "CUDAExecutionProvider":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EdgeloraError(f"target {ctx.target.name} needs CUDAExecutionProvider; install edgelora[gpu] on a "
                                "machine with an NVIDIA GPU, or choose a cpu-* target")


def read_adapters(ctx: ExportContext) -> None:
    for name, path in ctx.adapters.items():
        ctx.step(f"checking adapter {name}")
        ctx.prepared[name] = prepare(ctx.base, load_adapter(path, allow_pickle=ctx.allow_pickle))
    tasks = {p.task for p in ctx.prepared.values()}
    if len(tasks) > 1:
        raise EdgeloraError("adapters are for different tasks (" + ", ".join(
            f"{n}: {p.task}" for n, p in ctx.prepared.items()) + "); export one task type per deployment")
    ctx.task = tasks.pop()
    if ctx.task not in TASKS:
        raise EdgeloraError(f"export of {ctx.task} adapters is not supported yet; supported: {', '.join(TASKS)}")
    if ctx.target.decoder_graph != "trace" and ctx.task != "causal-lm":
        raise EdgeloraError(f"target {ctx.target.name} builds decoder graphs (decoder_graph = "
                            f"{ctx.target.decoder_graph!r}); this is a {ctx.task} model: choose cpu-fp32 or cpu-int8")
    first = next(iter(ctx.prepared.values()))
    ctx.base_path, ctx.base_fingerprint = first.base_path, first.base_fingerprint
    ctx.family = str(read_config(first.base_path).get("model_type", ""))
    ctx.model_config = first.model.config
    positions = _config_int(ctx.model_config, "max_position_embeddings", "n_positions", "n_ctx")
    if ctx.target.decoder_graph != "trace" and positions is not None and positions < ctx.target.shapes.sequence:
        # the builder sizes its rotary cache and KV buffer from the target's sequence: ONNX Runtime would fail
        # deep in the first check, after the base engine was built
        raise EdgeloraError(f"target {ctx.target.name} builds a decoder graph for {ctx.target.shapes.sequence} "
                            f"positions ([shapes] sequence) but the base {ctx.base_path} has {positions} "
                            f"(max_position_embeddings); use a target file with sequence ≤ {positions}, or a base "
                            "with more positions")
    ctx.headless = ctx.task != "causal-lm"  # encoders: the base engine is the encoder; heads travel with tasks
    ctx.eval_sets = {name: _read_eval(Path(f), ctx.prepared[name]) for name, f in ctx.evals.items()}


def read_calibration(ctx: ExportContext) -> None:
    """A static int8 target's texts per task (``--calibrate``), read and checked before any work; refused for any
    other target. The base calibrates on them; every engine's parity is measured on some of them."""
    if _static(ctx):
        if ctx.task == "causal-lm":
            raise EdgeloraError(f"target {ctx.target.name}: static int8 (QDQ) is for encoders; use cpu-int8 or "
                                "cpu-int4 for a causal LM")
        files = calibration_files(ctx.calibrate, list(ctx.adapters))
        ctx.calibration_texts = {name: read_texts(f) for name, f in files.items()}
    elif ctx.calibrate:
        raise EdgeloraError(f"--calibrate: target {ctx.target.name} is not calibrated (only [quantization] method = "
                            "'static' is); drop --calibrate or choose a static int8 target")


# ---------------------------------------------------------------------------------------------- the base
def build_base(ctx: ExportContext) -> None:
    ctx.step("exporting base engine")
    model = _first(ctx).model  # not merged yet: W0 everywhere
    calibration = _calibration(ctx) if _static(ctx) else None
    if calibration is not None:
        ctx.step("calibrating static int8 (sensitivity pass)")
    build = ctx.backend.build_engine(model, ctx.task, ctx.headless, ctx.target, ctx.work, "base", ctx.family,
                                     calibration=calibration)
    ctx.step("mapping LoRA targets to the engine's weights")
    locations, weights = ctx.backend.map_weights(build, _w0(ctx))
    engine = ctx.backend.save_base(build, ctx.out)
    ctx.base_result = base = BaseResult(build, engine, locations, weights)
    ctx.step("verifying base engine")
    sess = _session(ctx, ctx.out / engine)
    base.parity = _check(sess, model, build.spec, ctx, ctx.headless)
    base.latency_ms = _latency(ctx, sess, build.spec, ctx.latency_runs)
    # a headless encoder's outputs are hidden states: their scale is the model's and an argmax over hidden
    # units means nothing, so only the cosine is held to the tolerance there
    miss = [m for m in within(base.parity, ctx.target.tolerance) if not ctx.headless or m.startswith("cosine")]
    if miss and not (ctx.headless and _static(ctx)):
        ctx.failures.append(f"base: {'; '.join(miss)}")
    # (static int8: a headless base's hidden states, every activation rounded to 8 bits, measure ~0.92 cosine on
    # W1 while each task's logits measure 0.997; the tasks' engines, checked below on the same texts, are the gate)
    if build.fused and ctx.target.precision == "fp32":
        base.unfused_latency_ms = _latency(ctx, _session(ctx, build.raw), build.spec, ctx.latency_runs)


def build_runtime_graphs(ctx: ExportContext) -> None:
    base = _base(ctx)
    if ctx.target.lora_graph:
        base.branches = ctx.backend.branch_graph(base.build, ctx.out, _w0(ctx), ctx.target)
    ctx.step("writing the swap graph for the on-device runtime")
    base.swap, base.swap_reason = ctx.backend.swap_graph(base.build, ctx.out, ctx.target, base.weights,
                                                         base.locations, base.branches)
    # each weight's ΔW is computed in the layout the swap graph feeds it, by the exporter's merge, the patcher
    # and the runtime alike: a swap then rebuilds the baked weights bit for bit
    base.layouts = {m: loc.layout for m, loc in base.swap.modules.items()} if base.swap else {}


def plan_baking(ctx: ExportContext) -> None:
    base = _base(ctx)
    if ctx.bake == "reexport":
        base.patch_reason = "asked for (bake = reexport)"
    elif ctx.target.bake_task_engines:
        base.patch, base.patch_reason = ctx.backend.patch_plan(ctx.out, base.weights, base.locations)


# ---------------------------------------------------------------------------------------------- the tasks
def export_tasks(ctx: ExportContext) -> None:
    for name, p in ctx.prepared.items():
        reference = _reference_vectors(ctx, name, p)  # the no-LoRA half first, on the unmerged model
        task = _delta(ctx, name, p)
        _check_branches(ctx, task)
        if ctx.target.bake_task_engines:
            _bake(ctx, task)
            _verify_baked(ctx, task)
        task.conformance = reference()
        task.entry = _entry(task)
        ctx.tasks[name] = task


def _delta(ctx: ExportContext, name: str, p: Prepared) -> TaskResult:
    """The task's delta file (+ its ONNX Runtime adapter file) and manifest entry."""
    ctx.step(f"task {name}: delta")
    modules, head, reason = _delta_for(p)
    task = TaskResult(name, p, modules, head, reason)
    write_delta(ctx.out / delta_path(name), modules, head, ctx.base_fingerprint, p.head.labels if head else None,
                _pooling(p, head))
    branches = _base(ctx).branches
    if branches is not None and reason is None:
        ctx.backend.write_task_adapter(ctx.out / ort_adapter_path(name), modules, branches)
    if (ctx.out / ort_adapter_path(name)).exists():
        task.ort_adapter = ort_adapter_path(name)
    task.report = {"accuracy": None, "torch_accuracy": None, "max_abs_diff": None, "cosine": None,
                   "agreement": None, "latency_ms": None, "engine_size_bytes": None,
                   "delta_size_bytes": engine_size(ctx.out / delta_path(name))}
    return task


def _check_branches(ctx: ExportContext, task: TaskResult) -> None:
    """The LoRA-branch graph fed the task's A, B vs the merged PyTorch model (DoRA / LoRA bias have no branch
    form: baked engine only)."""
    base = _base(ctx)
    if base.branches is None or task.not_swappable is not None:
        return
    ctx.step(f"task {task.name}: unmerged (LoRA branches) check")
    model = task.prepared.model
    merge_into_model(model, task.prepared.plan, base.layouts)
    dims = {m: loc.dims() for m, loc in base.branches.modules.items()}
    extra = stacked_feeds([task.modules], dims)
    parity = _check(_branch_session(ctx), model, base.build.spec, ctx, ctx.headless, extra, task.name)
    task.report["unmerged_max_abs_diff"], task.report["unmerged_cosine"] = parity.max_abs_diff, parity.cosine
    miss = [m for m in within(parity, ctx.target.tolerance) if not ctx.headless or m.startswith("cosine")]
    if miss:
        ctx.failures.append(f"{task.name} (LoRA branches): {'; '.join(miss)}")


def _bake(ctx: ExportContext, task: TaskResult) -> None:
    """The task engine: the base engine patched with ``W0 + s·B·A`` where the plan allows, else the merged
    model exported again; the report says which and why."""
    base, p = _base(ctx), task.prepared
    merge_into_model(p.model, p.plan, base.layouts)
    dst = ctx.out / task_engine_path(task.name)
    reason = base.patch_reason if base.patch is None else _task_patch_reason(ctx, task)
    if reason is None:
        ctx.step(f"task {task.name}: engine (base engine patched)")
        ctx.backend.bake_patched(base.patch, base.weights, task.modules, base.layouts,
                                 task.head if ctx.headless and task.head else None, dst, _pooling(p, task.head))
        spec = dict(base.build.spec)
        if ctx.headless and task.head:
            spec |= {"kind": "sequence-classification", "outputs": ["logits"]}
        task.report["bake"] = "patched"
    else:
        ctx.step(f"task {task.name}: engine (merged model exported again)")
        build = ctx.backend.build_engine(p.model, ctx.task, False, ctx.target, ctx.work, f"task-{task.name}",
                                         ctx.family)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build.final, dst)
        spec = build.spec
        task.report["bake"] = f"re-exported: {reason}"
    task.engine, task.engine_io = task_engine_path(task.name), spec


def _task_patch_reason(ctx: ExportContext, task: TaskResult) -> str | None:
    targets = task.prepared.plan.targets
    return ctx.backend.task_patch_reason({t.module: t.lora.kind for t in targets},
                                         any(t.lora.magnitude is not None for t in targets),
                                         any(t.lora.bias is not None for t in targets), task.head, ctx.headless)


def _verify_baked(ctx: ExportContext, task: TaskResult) -> None:
    ctx.step(f"task {task.name}: verify")
    p, tol = task.prepared, ctx.target.tolerance
    path = ctx.out / task_engine_path(task.name)
    sess = _session(ctx, path)
    parity = _check(sess, p.model, task.engine_io, ctx, False, task=task.name)
    task.report.update(parity.to_json())
    # a patched engine is the base engine's graph: its latency is the base's, so a few runs tell it
    runs = max(5, ctx.latency_runs // 6) if task.report.get("bake") == "patched" else ctx.latency_runs
    task.report["latency_ms"] = _latency(ctx, sess, task.engine_io, runs)
    task.report["engine_size_bytes"] = engine_size(path)
    # what the task adds to the folder: its delta, adapter file and engine file (not the base data it shares)
    own = [delta_path(task.name), task.engine, task.ort_adapter]
    task.report["task_bytes"] = sum((ctx.out / f).stat().st_size for f in own if f)
    task.runtime_reference = _runtime_reference(ctx, sess, task.engine_io)
    miss = within(parity, tol)
    if task.name in ctx.eval_sets:
        ctx.step(f"task {task.name}: accuracy on {Path(ctx.evals[task.name]).name}")
        from ..verify import classify_accuracy

        texts, labels = ctx.eval_sets[task.name]
        acc, torch_acc = classify_accuracy(sess, p.model, _tokenizer(ctx), texts, labels)
        task.report["accuracy"], task.report["torch_accuracy"] = acc, torch_acc
        drop = (torch_acc - acc) * 100
        if drop > tol.max_accuracy_drop:
            miss.append(f"accuracy {acc:.2%} vs PyTorch {torch_acc:.2%} "
                        f"(drop {drop:.2f} > {tol.max_accuracy_drop:g} points)")
    if miss:
        ctx.failures.append(f"{task.name}: {'; '.join(miss)}")


# ---------------------------------------------------------------------------------------------- the phone
def convert_mobile(ctx: ExportContext) -> None:
    """ONNX Runtime Mobile (a target with ``[mobile]``): ``mobile/*.ort`` for the engines the runtime and an app
    run — the base engine, the swap graph, the baked task engines, and the branch graph where the runtime runs
    tasks on it (decoders, no swap graph) or ``[mobile] lora_graph`` asks — and ``required_operators.config``,
    written by ONNX Runtime's converter. Each ``.ort`` must compute what its ``.onnx`` computes, bit for bit."""
    mobile = ctx.target.mobile
    if mobile is None:
        return
    base = _base(ctx)
    engines = [base.engine, *([base.swap.engine] if base.swap else [])]
    if base.branches is not None and (mobile.lora_graph or base.swap is None or ctx.task == "causal-lm"):
        engines.append(base.branches.engine)
    engines += [t.engine for t in ctx.tasks.values() if t.engine]
    ctx.step(f"ONNX Runtime Mobile: {len(engines)} ORT-format models")
    assert ctx.work is not None
    models = ctx.backend.ort_models(ctx.out, ctx.work, engines, mobile)
    rows = {}
    for rel, ort_rel in models.engines.items():
        ctx.step(f"ONNX Runtime Mobile: {ort_rel} vs {rel}")
        diff = _ort_parity(ctx, ctx.out / rel, ctx.out / ort_rel)
        rows[rel] = {"ort": ort_rel, "onnx_bytes": engine_size(ctx.out / rel),
                     "ort_bytes": (ctx.out / ort_rel).stat().st_size, "max_abs_diff": diff}
        if diff != 0.0:
            ctx.failures.append(f"{ort_rel}: max |Δ| {diff:.3g} vs {rel} (an ORT-format model must compute "
                                "what its ONNX model computes)")
    ctx.mobile = MobileSpec(models.engines, models.operators, models.onnxruntime, mobile.optimization_level,
                            mobile.optimization_style, mobile.target_platform,
                            tuple(DeviceProviderSpec(p.name, p.options.provider_options())
                                  for p in ctx.target.providers))
    ctx.mobile_report = {"engines": rows, "operators": models.operators, "onnxruntime": models.onnxruntime}


def _ort_parity(ctx: ExportContext, onnx_path: Path, ort_path: Path) -> float:
    """max |Δ| over every output of the ``.ort`` vs its ``.onnx`` (opened as the converter saw it) on the same
    feeds: the fixed inputs, an empty KV cache, and seeded values for inputs such as the swap graph's weights."""
    from ..runtime.sessions import session_options

    reference, model = ctx.backend.ort_pair(onnx_path, ort_path, ctx.target.mobile, session_options(ctx.threads),
                                            session_options(ctx.threads))
    feeds = _any_feeds(ctx, reference)
    diffs = [float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
             for a, b in zip(reference.run(None, feeds), model.run(None, feeds), strict=True)]
    return max(diffs, default=0.0)


def _any_feeds(ctx: ExportContext, sess: Any) -> dict[str, np.ndarray]:
    """Feeds for any engine of the folder: the runtime check's inputs, an empty KV cache, seeded values of the
    right type for other inputs of static shape (fed weights, int8 weights and their scales); inputs of dynamic
    shape beyond those (the branch graph's A, B, mask) keep their defaults."""
    base = _runtime_inputs(ctx)
    rows = base["input_ids"].shape[0]
    io = _base(ctx).build.spec
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        static = all(isinstance(d, int) for d in i.shape)
        if i.name in base:
            feeds[i.name] = base[i.name]
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros_like(base["input_ids"])
        elif i.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((rows, io["num_kv_heads"], 0, io["head_dim"]), dtype)
        elif static and i.type == "tensor(int8)":
            feeds[i.name] = rng.integers(-127, 128, i.shape).astype(np.int8)
        elif static and i.type in ("tensor(float)", "tensor(float16)"):
            scale = 1e-3 if i.name.endswith("_scale") else 0.05
            value = np.abs(rng.standard_normal(i.shape)) * scale if i.name.endswith("_scale") else \
                rng.standard_normal(i.shape) * scale
            feeds[i.name] = value.astype(np.float16 if "16" in i.type else np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------- the folder
def write_conformance(ctx: ExportContext) -> None:
    """``conformance.safetensors``: each task's reference inputs and PyTorch's outputs for them, with the target's
    tolerances (the manifest's ``conformance`` section): what ``Runtime.self_test`` re-runs on the device. A
    folder the runtime does not run through ONNX Runtime gets none, and the manifest says why."""
    refs = {name: t.conformance for name, t in ctx.tasks.items() if t.conformance is not None}
    if ctx.target.backend != "onnxruntime":
        ctx.conformance_unavailable = (f"backend {ctx.target.backend}: the runtime's self test runs ONNX Runtime "
                                       "folders only")
        return
    if not refs or len(refs) != len(ctx.tasks):
        ctx.conformance_unavailable = "no PyTorch reference for a task of this folder"
        return
    tol = ctx.target.tolerance
    save_tensors(reference_tensors(refs), ctx.out / CONFORMANCE_FILE, {"format": "1", "reference": "pytorch"})
    ctx.conformance = ConformanceSpec(
        CONFORMANCE_FILE, "pytorch", ConformanceTolerance(tol.max_abs_diff, tol.min_cosine, tol.min_agreement),
        {name: ConformanceTask(tuple(r.outputs), r.positions) for name, r in refs.items()})


def check_conformance(ctx: ExportContext) -> None:
    """The device's own check (``Runtime.self_test``) run on the folder before it is published: a folder that
    fails it here is never written. Its time and check count go to the report."""
    if ctx.conformance is None or ctx.failures:
        return
    ctx.step("conformance: the folder's reference vectors through the on-device runtime")
    from ..runtime import Runtime

    result = Runtime.open(ctx.out, threads=ctx.threads, provider=ctx.target.provider).self_test()
    ctx.conformance_report = {"checks": len(result.checks), "seconds": round(result.seconds, 3),
                              "mode": result.mode, "ok": result.ok}
    if not result.ok:
        ctx.failures.append(result.summary())


def write_manifest(ctx: ExportContext) -> None:
    ctx.step("writing manifest and report")
    base, out = _base(ctx), ctx.out
    (out / TOKENIZER_DIR).mkdir()
    copy_tokenizer(ctx.base_path, out / TOKENIZER_DIR)
    config = ctx.model_config
    name = DEFAULT_BASE_NAME if ctx.base_path == bundled_base_path() else str(Path(ctx.base_path).resolve())
    target = ctx.target.to_json()
    manifest = Manifest(
        format=FORMAT_VERSION, edgelora_version=__version__, task=ctx.task,
        base=BaseInfo(name, ctx.base_fingerprint, base.engine, _io(base.build.spec), ctx.headless,
                      int(config.vocab_size),
                      # the longest sequence the position embeddings cover; the width a task head reads
                      _config_int(config, "max_position_embeddings", "n_positions", "n_ctx"),
                      _config_int(config, "hidden_size", "n_embd", "d_model"), ctx.family, base.build.fused),
        target=TargetInfo(ctx.target.name, ctx.target.provider, ctx.target.precision, ctx.target.shapes.sequence,
                          target),
        tokenizer=TOKENIZER_DIR if any((out / TOKENIZER_DIR).iterdir()) else None,
        name_map=base.locations, name_map_graph="fused fp32" if base.build.fused else "fp32",
        lora_graph=base.branches, swap=base.swap,
        swap_unavailable=base.swap_reason, mobile=ctx.mobile,
        conformance=ctx.conformance, conformance_unavailable=ctx.conformance_unavailable,
        tasks={name: t.entry for name, t in ctx.tasks.items() if t.entry is not None},
        # size and sha256 of every file the folder holds, reports (written after) excepted: the runtime
        # checks what it reads against them, `edgelora verify` checks all of them
        files=file_table(out, exclude_dirs=frozenset({WORK_DIR})),
    )
    ctx.manifest = manifest.to_json()
    write_json(out / MANIFEST, ctx.manifest)


def check_runtime(ctx: ExportContext) -> None:
    """What the device will compute: ``edgelora.runtime`` on this folder, each task activated (weights rebuilt,
    or fed as branches), vs the task's baked engine on fixed inputs: max |Δ| of the logits. A swap rebuilds
    the baked engine's weights, so it is held to the tolerance; unmerged (int4: LoRA beside a quantized W0)
    is a different approximation and is reported only."""
    base = _base(ctx)
    if base.swap is None and base.branches is None:
        return
    ctx.step("checking the on-device runtime against the baked engines")
    from ..runtime import Runtime

    rt = Runtime.open(ctx.out, threads=ctx.threads, provider=ctx.target.provider)
    # A mobile folder's runtime runs the .ort models; the one on the .onnx models computes the same bytes where
    # the .ort was made at ONNX Runtime's default (the level and style the runtime opens .onnx at: all, fixed).
    # Made otherwise, it runs other kernels (each .ort was checked bit for bit against its .onnx at its own level),
    # so the two runtimes agree to rounding: the target's tolerance.
    onnx_rt = Runtime.open(ctx.out, threads=ctx.threads, provider=ctx.target.provider, engine_format="onnx") \
        if rt.engine_format == "ort" else None
    mobile = ctx.target.mobile
    ort_limit = 0.0 if mobile and (mobile.optimization_level, mobile.optimization_style) == ("all", "fixed") \
        else ctx.target.tolerance.max_abs_diff
    inputs = _runtime_inputs(ctx)
    for name, task in ctx.tasks.items():
        ref = task.runtime_reference
        if ref is None or task.not_swappable is not None:
            continue
        rt.activate(name)
        logits = rt.run(**inputs)["logits"]
        diff = float(np.abs(logits - ref).max())
        task.report["runtime_max_abs_diff"] = diff
        if base.swap is not None and diff > ctx.target.tolerance.max_abs_diff:
            ctx.failures.append(f"{name} (runtime swap): max |Δ| {diff:.3g} vs the baked engine > "
                                f"{ctx.target.tolerance.max_abs_diff:g}")
        if onnx_rt is not None:
            ort_diff = float(np.abs(logits - onnx_rt.run(task=name, **inputs)["logits"]).max())
            task.report["runtime_ort_vs_onnx_max_abs_diff"] = ort_diff
            if ort_diff > ort_limit:
                ctx.failures.append(f"{name} (runtime on the .ort models): max |Δ| {ort_diff:.3g} vs the runtime on "
                                    f"the .onnx models > {ort_limit:g}")


# Decoders on a shared-cache graph run tasks as LoRA branches when those cost at most TAX_LIMIT of the base's decode
# time (no rebuild, nothing per task but its A and B); else as swapped weights when a switch takes at most
# SWAP_LIMIT_MS and they decode within SWAP_TAX_LIMIT (memory: one more set of the LoRA targets' weights); else on
# each task's baked engine (the base's speed, but a whole session per resident task: 8 W2 fp32 tasks, 6 GB).
TAX_LIMIT = 1.03
SWAP_LIMIT_MS = 20.0
SWAP_TAX_LIMIT = 1.10


def choose_runtime_mode(ctx: ExportContext) -> None:
    """Decoders on a shared-cache graph (``decoder_graph = "genai-builder"``): measure, on this folder, the
    runtime's decode rate for the base and for a task in each mode the folder offers (interleaved rounds of
    ``generate``), and a swap's rebuild; record the mode the runtime opens the folder in and why
    (``runtime_mode`` in the manifest and the report)."""
    base = _base(ctx)
    if ctx.task != "causal-lm" or base.build.spec.get("kv_cache") != "shared" or ctx.failures:
        return
    task = next((n for n, t in ctx.tasks.items() if t.not_swappable is None and t.engine), None)
    if task is None:
        return
    ctx.step("choosing how the runtime runs tasks (decode rate per mode)")
    from ..runtime import Runtime

    modes = ["engines", *(["unmerged"] if base.branches else []), *(["swap"] if base.swap else [])]
    rts = {m: Runtime.open(ctx.out, threads=ctx.threads, provider=ctx.target.provider, mode=m) for m in modes}
    runs = {"base": (rts["engines"], None), **{m: (rt, task) for m, rt in rts.items()}}
    new = 32
    length = max(1, min(ctx.target.shapes.sequence, (rts["engines"].max_positions or 1 << 30) - new) - new)
    prompt = np.random.default_rng(0).integers(5, int(ctx.model_config.vocab_size), length).tolist()
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(5):
        for key, (rt, name) in runs.items():
            marks: list[float] = []
            rt.generate(prompt, new, task=name, stream=lambda _t, m=marks: m.append(time.perf_counter()))
            rates[key].append((len(marks) - 1) / (marks[-1] - marks[0]))
    rate = {k: float(np.median(v)) for k, v in rates.items()}
    tax = {m: rate["base"] / rate[m] for m in modes}
    measured: dict[str, Any] = {"decode_tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
                                "tax_vs_base": {m: round(t, 3) for m, t in tax.items()}}
    if "swap" in rts:
        rt, ms = rts["swap"], []
        other = next((n for n in ctx.tasks if n != task and ctx.tasks[n].not_swappable is None), None)
        for i in range(6):  # task to task (every LoRA target rebuilt), as an app switching tasks does
            rt._forget_built()
            t0 = time.perf_counter()
            rt.activate(task if i % 2 == 0 else other)
            ms.append((time.perf_counter() - t0) * 1e3)
        measured["swap_ms"] = round(float(np.median(ms)), 2)
    if tax.get("unmerged", np.inf) <= TAX_LIMIT:
        mode, why = "unmerged", (f"LoRA branches decode at {tax['unmerged']:.3f}x the base's time (≤ {TAX_LIMIT}x): "
                                 "a switch only changes the fed A, B")
    elif tax.get("swap", np.inf) <= SWAP_TAX_LIMIT and measured.get("swap_ms", np.inf) <= SWAP_LIMIT_MS:
        mode, why = "swap", (f"swapped weights decode at {tax['swap']:.3f}x the base's time (≤ {SWAP_TAX_LIMIT}x) "
                             f"and rebuild in {measured['swap_ms']:.1f} ms (≤ {SWAP_LIMIT_MS:g} ms); branches "
                             f"{tax.get('unmerged', float('nan')):.3f}x")
    else:
        others = ", ".join(f"{m} {tax[m]:.2f}x" for m in modes if m != "engines")
        swap = f", a swap {measured['swap_ms']:.1f} ms" if "swap_ms" in measured else ""
        mode, why = "engines", (f"decode time vs the base's: {others}{swap}; each task's baked engine "
                                f"{tax['engines']:.2f}x (one session per resident task)")
    ctx.manifest["runtime_mode"] = {"mode": mode, "why": why, "measured": measured}
    write_json(ctx.out / MANIFEST, ctx.manifest)


def write_report(ctx: ExportContext) -> None:
    base = _base(ctx)
    parity = base.parity.to_json() if base.parity else {}
    ctx.report = {
        "target": ctx.target.name,
        "precision": ctx.target.precision,
        "base": {"fingerprint": ctx.base_fingerprint, "size_bytes": engine_size(ctx.out / base.engine),
                 "latency_ms": base.latency_ms, **parity, **({"agreement": None} if ctx.headless else {}),
                 "unfused_latency_ms": base.unfused_latency_ms},
        "tasks": {name: t.report for name, t in ctx.tasks.items()},
        "bake": {"patched": base.patch is not None, "reason": base.patch_reason},
        **({"runtime_mode": ctx.manifest["runtime_mode"]} if ctx.manifest and "runtime_mode" in ctx.manifest else {}),
        **({"quantization": base.build.quantization} if base.build.quantization else {}),
        "device_bundle": _bundle_size(ctx),
        **({"mobile": ctx.mobile_report} if ctx.mobile_report else {}),
        "export_seconds": round(time.perf_counter() - ctx.started, 1),
        "machine": {"threads": ctx.threads, "cpu": platform.processor() or platform.machine()},
        **({"conformance": ctx.conformance_report} if ctx.conformance_report else {}),
        "failures": ctx.failures,
    }
    write_json(ctx.out / REPORT_JSON, ctx.report)
    (ctx.out / REPORT_MD).write_text(report_markdown(ctx.report), encoding="utf-8")


BUILD_STEPS = (build_base, build_runtime_graphs, plan_baking, export_tasks, convert_mobile, write_conformance,
               write_manifest, check_runtime, choose_runtime_mode, check_conformance, write_report)


# ---------------------------------------------------------------------------------------------- helpers
def _entry(t: TaskResult) -> TaskEntry:
    p = t.prepared
    return TaskEntry(
        t.name, delta_path(t.name), tuple(p.head.labels) if p.head.labels else None, p.head.num_labels,
        t.not_swappable is None, t.not_swappable, t.engine, _io(t.engine_io) if t.engine_io else None,
        adapter_hash=p.plan.adapter_hash,
        adapter_path=adapter_record(p.adapter.source) if p.adapter.source else None,
        rank=max((x.lora.rank for x in p.plan.targets), default=0),
        scale=tuple(sorted({x.lora.scale for x in p.plan.targets})),
        targets=tuple(sorted({x.module.rsplit(".", 1)[-1] for x in p.plan.targets})),
        modules={x.module: ModuleInfo(x.lora.rank, x.lora.scale) for x in p.plan.targets},
        head=tuple(sorted(t.head)), ort_adapter=t.ort_adapter, pooling=_pooling(p, t.head))


def _io(spec: dict[str, Any]) -> EngineIO:
    return EngineIO(spec["kind"], tuple(spec["inputs"]), tuple(spec["outputs"]), spec["num_layers"],
                    spec["num_kv_heads"], spec["head_dim"], spec.get("kv_cache", "concat"))


def _bundle_size(ctx: ExportContext) -> dict[str, Any]:
    """What `edgelora pack` would write: its bytes, beside the base engine's and the deltas'."""
    from ..format.manifest import read_manifest
    from .bundle import plan_bundle

    manifest = read_manifest(ctx.out)
    bundle = plan_bundle(ctx.out, manifest)
    base = engine_size(ctx.out / manifest.base.engine)
    deltas = sum(manifest.files[t.delta].size for t in manifest.tasks.values())
    return {"bytes": bundle.size_bytes, "files": len(bundle.files), "base_engine_bytes": base,
            "deltas_bytes": deltas, "vs_base_and_deltas": round(bundle.size_bytes / (base + deltas), 4)}


def _first(ctx: ExportContext) -> Prepared:
    return next(iter(ctx.prepared.values()))


def _base(ctx: ExportContext) -> BaseResult:
    assert ctx.base_result is not None, "build_base runs first"  # internal order, not user input
    return ctx.base_result


def _w0(ctx: ExportContext) -> dict[str, np.ndarray]:
    """module -> W0 (out, in), fp32, from the (unmerged) base model, for every adapter's targets."""
    model = _first(ctx).model
    state = model.state_dict()
    w0: dict[str, np.ndarray] = {}
    for p in ctx.prepared.values():
        for t in p.plan.targets:
            if t.module not in w0:
                w = state[t.weight_key].detach().to("cpu").float().numpy()
                w0[t.module] = np.ascontiguousarray(w.T if t.fan_in_fan_out else w)
    return w0


def _pooling(p: Prepared, head: Mapping[str, np.ndarray]) -> str:
    """What the task's classifier reads ("cls" for a task without one: nothing reads anything)."""
    return p.head.pooling if "classifier.weight" in head else "cls"


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


def _text_inputs(ctx: ExportContext, task: str | None = None) -> dict[str, np.ndarray]:
    """Sixteen texts from the calibration files' ends (the check texts, not calibrated on), padded to the target's
    sequence length: what a calibrated engine's parity is measured on. A task with texts of its own is held to
    those (another task's texts are out of its domain: AG News' topics of a movie review sit near a boundary, so
    one flip in eight mixed texts failed agreement 0.9 while the task agreed on 99.6% of its own checks)."""
    enc = _tokenizer(ctx)(check_texts(ctx.calibration_texts, task), padding="max_length", truncation=True,
                          max_length=ctx.target.shapes.sequence, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def check_texts(texts: Mapping[str, Sequence[str]], task: str | None = None) -> list[str]:
    """The texts :func:`_text_inputs` checks on: the task's own last sixteen, or (the base, or a task without
    texts) an equal share of every task's last ones, sixteen in all (the build's re-derivation uses the same)."""
    own = texts.get(task) if task is not None else None
    if own:
        return list(own[-16:])
    per = max(1, 16 // max(1, len(texts)))
    return [t for name in sorted(texts) for t in texts[name][-per:]][:16]


def _static(ctx: ExportContext) -> bool:
    return ctx.target.precision == "int8" and ctx.target.quantization.method == "static"


def _calibration(ctx: ExportContext) -> Any:
    """The calibration set of a static int8 base: every task's texts; each task checked with its LoRA and head."""
    tasks = {name: (*_delta_for(p)[:2], p.head.pooling) for name, p in ctx.prepared.items()}
    return build_calibration(ctx.calibration_texts, tasks, _w0(ctx), _tokenizer(ctx), ctx.target.quantization,
                             ctx.target.shapes.sequence)


def _session(ctx: ExportContext, path: Path) -> Any:
    from ..runtime.sessions import session_options

    return ctx.backend.session(path, ctx.target.provider, session_options(ctx.threads))


def _branch_session(ctx: ExportContext) -> Any:
    """One session on base/lora.onnx for every task's branch check (each task feeds its own A, B)."""
    base = _base(ctx)
    if base.branch_session is None:
        base.branch_session = _session(ctx, ctx.out / base.branches.engine)  # type: ignore[union-attr]
    return base.branch_session


def _check(sess: Any, model: Any, spec: dict[str, Any], ctx: ExportContext, headless: bool,
           extra: dict[str, np.ndarray] | None = None, task: str | None = None) -> Parity:
    from ..verify import check_causal_lm, check_encoder, fixed_inputs

    vocab = int(model.config.vocab_size)
    inputs = fixed_inputs(vocab, max(2, ctx.target.shapes.batch), ctx.target.shapes.sequence)  # one row padded
    if ctx.calibration_texts:  # a calibrated engine is held to real text: random ids lie outside its ranges
        inputs = _text_inputs(ctx, task)
    if spec["kind"] == "causal-lm":
        return check_causal_lm(sess, model, spec, inputs, extra)
    return check_encoder(sess, model, inputs, headless, extra)


def _latency(ctx: ExportContext, sess: Any, spec: dict[str, Any], runs: int) -> float:
    from ..latency import latency_inputs, session_latency

    vocab = int(ctx.model_config.vocab_size)
    feeds = latency_inputs(sess, spec, ctx.target.shapes.batch, ctx.target.shapes.sequence, vocab)
    return session_latency(sess, feeds, runs=runs)["median_ms"]


REFERENCE_FLOATS = 1 << 13  # a decoder's reference logits at every position up to this many floats (32 KB) a tensor


def _reference_vectors(ctx: ExportContext, name: str, p: Prepared) -> Callable[[], Reference]:
    """The task's reference inputs and what PyTorch computes for them, in two steps: called before the model is
    merged it computes the outputs with the task's head on W0 (no LoRA: how far the LoRA moves them, so a device
    can tell a no-op task from one whose change is within its quantization error) and returns the function that,
    called once the checks have merged the adapter (as every engine is checked against), computes the outputs
    with it. Inputs: the runtime check's two rows (one half padding) for an encoder, two prompts' logits for a
    decoder (at every position, or at the last where those would weigh more than REFERENCE_FLOATS); a static int8
    target's own texts (random ids lie outside its calibrated ranges)."""
    inputs = _runtime_inputs(ctx)
    texts = ctx.calibration_texts.get(name) or next(iter(ctx.calibration_texts.values()), None)
    if texts and ctx.task != "causal-lm":
        enc = _tokenizer(ctx)(texts[-4:], padding="max_length", truncation=True,
                              max_length=ctx.target.shapes.sequence, return_tensors="np")
        inputs = {"input_ids": enc["input_ids"].astype(np.int64),
                  "attention_mask": enc["attention_mask"].astype(np.int64)}
    # a decoder's logits at every position where they are small (tens of KB at most: agreement over
    # every position, as the export's own check), else at the last one (W2: 2 × 49,152 floats, not 6 MB)
    ids = inputs["input_ids"]
    positions = "last" if ctx.task == "causal-lm" and ids.size * int(ctx.model_config.vocab_size) > \
        REFERENCE_FLOATS else "all"
    engine_outputs = set(_base(ctx).build.spec["outputs"])  # a headless task's outputs are the base engine's
    if merged_adapter(p.model) is not None:
        unmerge(p.model)
    without = _torch_reference(ctx, p.model, inputs, dict(p.plan.replacements), engine_outputs, positions)

    def merged() -> Reference:
        merge_into_model(p.model, p.plan, _base(ctx).layouts)  # a no-op where the checks merged it already
        return Reference(inputs, _torch_reference(ctx, p.model, inputs, {}, engine_outputs, positions), positions,
                         without)

    return merged


def _torch_reference(ctx: ExportContext, model: Any, inputs: dict[str, np.ndarray], overrides: dict[str, Any],
                     engine_outputs: set[str], positions: str) -> dict[str, np.ndarray]:
    """PyTorch's outputs for ``inputs`` (``overrides``: state-dict tensors used in place of the model's, the
    task's head on an unmerged model): decoders' logits (at ``positions``), a classifier's logits, else the
    hidden states the base engine outputs."""
    import torch

    from ..verify import torch_encoder_outputs

    ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])
    with torch.no_grad():
        if ctx.task == "causal-lm" or ctx.task == "sequence-classification":
            kwargs = {"input_ids": ids, "attention_mask": mask}
            out = torch.func.functional_call(model, overrides, (), kwargs) if overrides else model(**kwargs)
            logits = out.logits.float().numpy()
            return {"logits": np.ascontiguousarray(logits[:, -1] if positions == "last" else logits, np.float32)}
    outputs = torch_encoder_outputs(model, inputs, headless=True)  # feature extraction: no head to override
    return {k: np.ascontiguousarray(v, np.float32) for k, v in outputs.items() if k in engine_outputs}


def _runtime_inputs(ctx: ExportContext) -> dict[str, np.ndarray]:
    from ..verify import fixed_inputs

    inputs = fixed_inputs(int(ctx.model_config.vocab_size), 2, min(16, ctx.target.shapes.sequence))
    if ctx.task == "causal-lm":
        inputs["attention_mask"] = np.ones_like(inputs["attention_mask"])  # left-aligned rows, no padding
    return inputs


def _runtime_reference(ctx: ExportContext, sess: Any, io: dict[str, Any]) -> np.ndarray:
    """The baked engine's logits on the runtime check's inputs (computed while its session is open)."""
    feeds = _runtime_inputs(ctx)
    if io["kind"] == "causal-lm":
        feeds |= {n: np.zeros((2, io["num_kv_heads"], 0, io["head_dim"]), np.float32)
                  for n in io["inputs"] if n.startswith("past_key_values.")}
    return sess.run(["logits"], feeds)[0]


def _tokenizer(ctx: ExportContext) -> Any:
    if ctx.tokenizer is None:
        from transformers import AutoTokenizer

        ctx.tokenizer = AutoTokenizer.from_pretrained(str(ctx.base_path))
    return ctx.tokenizer


def _config_int(config: Any, *keys: str) -> int | None:
    """The first positive integer among a transformers config's ``keys`` (families name the same fact
    differently: ``max_position_embeddings`` / ``n_positions``, ``hidden_size`` / ``n_embd``), else None."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _read_eval(path: Path, p: Prepared) -> tuple[list[str], list[int]]:
    from ..data import read_classification

    if p.task != "sequence-classification":
        raise EdgeloraError(f"--eval {path}: accuracy is measured for classification adapters only")
    labels = p.head.labels
    if not labels:
        raise EdgeloraError(f"--eval {path}: the adapter has no label names (edgelora.json); re-train it with "
                            "edgelora train or evaluate with the adapter's own tooling")
    examples = read_classification(path)
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for n, e in enumerate(examples, 1):
        label = index.get(e.label)
        if label is None and e.label.lstrip("-").isdigit() and 0 <= int(e.label) < len(labels):
            label = int(e.label)
        if label is None:
            raise EdgeloraError(f"--eval {path}: example {n} has label {e.label!r}, which is neither one of the "
                                f"adapter's labels ({', '.join(labels)}) nor a class id 0..{len(labels) - 1}; fix "
                                "the file or pass the eval file of this task")
        ids.append(label)
    return [e.text for e in examples], ids
