"""``export()`` cut into stages that can run in different processes, for ``edgelora build``'s cells.

1. :func:`base_stage`  — once per base × target × set of LoRA targets: steps 3–5 (the base engine, the runtime's
   branch and swap graphs, the baking plan). Writes ``base/`` and its state (JSON + the fp32 W0 of the mapped
   weights).
2. :func:`task_stage`  — once per task × target: step 6 (delta, branch check, baked engine, its checks) over the
   base stage's files. Writes the task's files and its state (report row, manifest entry, reference logits).
3. :func:`assemble`    — once per target: the base's and the tasks' files into one deployment folder, then
   steps 7–10 (mobile targets' ORT-format models, manifest, the on-device runtime against every baked engine,
   report).

Each stage runs the same step functions as ``export()`` over an :class:`ExportContext` rebuilt from the previous
stage's state, so a folder assembled from cells holds the same bytes as one ``edgelora export`` of the same
adapters (``tests/test_build.py`` checks it). The states are JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeloraError
from ..format.conformance import Reference, parse_references, reference_tensors, save_tensors
from ..format.delta import save_float32_safetensors
from ..format.layout import delta_path, ort_adapter_path, task_engine_path
from ..format.manifest import ConformanceSpec, ConformanceTask, ConformanceTolerance, parse_section
from ..fsutil import atomic_output_dir, scratch_dir
from ..target import Target
from ..verify import Parity
from .context import BaseResult, ExportContext, TaskResult
from .steps import (
    build_base,
    build_runtime_graphs,
    check_conformance,
    check_request,
    check_runtime,
    choose_runtime_mode,
    convert_mobile,
    export_tasks,
    plan_baking,
    read_adapters,
    read_calibration,
    write_conformance,
    write_manifest,
    write_report,
)

BASE_STATE = "base-stage.json"
BASE_WEIGHTS = "base-stage-w0.safetensors"
TASK_STATE = "task-stage.json"
TASK_REFERENCE = "task-stage-reference.safetensors"
TASK_CONFORMANCE = "task-stage-conformance.safetensors"  # the task's reference vectors (inputs, PyTorch's outputs)
STAGE_FORMAT = 1

Progress = Callable[[str], None]


def _context(base: Any, adapters: Mapping[str, Path], target: Target, out: Path, evals: Mapping[str, Path],
             threads: int, latency_runs: int, progress: Progress | None) -> ExportContext:
    from ..converters import get_backend

    return ExportContext(base, dict(adapters), target, out, dict(evals), threads, latency_runs, False,
                         progress or (lambda step: None), backend=get_backend(target.backend),
                         started=time.perf_counter())


# ---------------------------------------------------------------------------------------------- 1. the base
def base_stage(base: Any, adapters: Mapping[str, Path], target: Target, out: Path, *, threads: int = 1,
               latency_runs: int = 30, progress: Progress | None = None,
               calibrate: Mapping[str, Path] | None = None) -> None:
    """``out`` (an empty folder) gets ``base/`` and the state the task stages read. ``adapters``: every task of
    the deployment (their LoRA targets are the weights the name map, branch and swap graphs cover); ``calibrate``:
    a static int8 target's texts per task."""
    ctx = _context(base, adapters, target, out, {}, threads, latency_runs, progress)
    ctx.calibrate = dict(calibrate or {})
    check_request(ctx)
    read_adapters(ctx)
    read_calibration(ctx)
    with scratch_dir(out) as work:
        ctx.out, ctx.work = out, work
        for step in (build_base, build_runtime_graphs, plan_baking):
            step(ctx)
    b = ctx.base_result
    assert b is not None
    state = {
        "stage_format": STAGE_FORMAT, "base_path": str(ctx.base_path), "base_fingerprint": ctx.base_fingerprint,
        "task": ctx.task, "family": ctx.family, "headless": ctx.headless, "modules": sorted(b.locations),
        "engine": b.engine, "spec": b.build.spec, "fused": b.build.fused, "quantization": b.build.quantization,
        "locations": {m: loc.to_json() for m, loc in sorted(b.locations.items())},
        "parity": b.parity.to_json() if b.parity else None, "latency_ms": b.latency_ms,
        "unfused_latency_ms": b.unfused_latency_ms,
        "branches": b.branches.to_json() if b.branches else None,
        "swap": b.swap.to_json() if b.swap else None, "swap_reason": b.swap_reason, "layouts": b.layouts,
        "patch": b.patch is not None, "patch_reason": b.patch_reason, "failures": ctx.failures,
    }
    save_float32_safetensors(b.weights, out / BASE_WEIGHTS, {"format": str(STAGE_FORMAT)})
    (out / BASE_STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeloraError(f"{path}: unreadable stage state ({exc}); rebuild the cell (--force)") from None
    if not isinstance(state, dict) or state.get("stage_format") != STAGE_FORMAT:
        raise EdgeloraError(f"{path}: written by another edgelora version; rebuild the cell (--force)")
    return state


def _base_result(ctx: ExportContext, base_dir: Path, folder: Path, state: dict[str, Any],
                 plan_patches: bool = True) -> BaseResult:
    """The base stage's result again, its patch plan made over the base files in ``folder`` (assembly bakes
    nothing: ``plan_patches=False`` keeps only the fact that tasks were patched, for the report)."""
    from safetensors.numpy import load_file

    where = str(base_dir / BASE_STATE)
    locations = parse_section("locations", state["locations"], where)
    weights = load_file(str(base_dir / BASE_WEIGHTS))
    build = _Build(state["spec"], state["fused"], state.get("quantization"))
    b = BaseResult(build, state["engine"], locations, weights)
    p = state["parity"]
    b.parity = Parity(p["max_abs_diff"], p["cosine"], p["agreement"]) if p else None
    b.latency_ms, b.unfused_latency_ms = state["latency_ms"], state["unfused_latency_ms"]
    b.branches = parse_section("lora_graph", state["branches"], where) if state["branches"] else None
    b.swap = parse_section("swap", state["swap"], where) if state["swap"] else None
    b.swap_reason, b.layouts, b.patch_reason = state["swap_reason"], dict(state["layouts"]), state["patch_reason"]
    if state["patch"] and not plan_patches:
        b.patch = True  # write_report reads only whether there was a plan
    elif state["patch"]:
        b.patch, reason = ctx.backend.patch_plan(folder, weights, locations)
        if b.patch is None:
            raise EdgeloraError(f"{base_dir}: the base engine can no longer be patched ({reason}); rebuild it")
    return b


class _Build:
    """What the task stages and assembly read of the base's EngineBuild: its io spec, whether it is fused, and its
    static int8 report."""

    def __init__(self, spec: dict[str, Any], fused: bool, quantization: dict[str, Any] | None = None) -> None:
        self.spec, self.fused, self.quantization = spec, fused, quantization


def _restore_ctx(ctx: ExportContext, state: dict[str, Any]) -> None:
    from transformers import AutoConfig

    ctx.base_path = Path(state["base_path"])
    ctx.base_fingerprint, ctx.task, ctx.family = state["base_fingerprint"], state["task"], state["family"]
    ctx.headless = state["headless"]
    if ctx.model_config is None:
        ctx.model_config = AutoConfig.from_pretrained(str(ctx.base_path))


def _copy_tree(src: Path, dst: Path) -> None:
    """``dst`` gets copies of the files of ``src`` (not hard links: ONNX refuses external data with several links,
    and a deployment folder must share no inode with the cache, so nothing done to it can change a cell)."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)


# ---------------------------------------------------------------------------------------------- 2. a task
def task_stage(base_dir: Path, name: str, adapter: Path, target: Target, out: Path, *, eval_file: Path | None = None,
               threads: int = 1, latency_runs: int = 30, progress: Progress | None = None,
               calibrate: Path | None = None) -> None:
    """``out`` (an empty folder) gets the task's delta, ONNX Runtime adapter, baked engine and state. ``calibrate``:
    a static int8 target's texts of this task (its engine's parity is measured on some of them)."""
    state = _read_state(base_dir / BASE_STATE)
    evals = {name: eval_file} if eval_file else {}
    ctx = _context(state["base_path"], {name: adapter}, target, out, evals, threads, latency_runs, progress)
    ctx.calibrate = {name: calibrate} if calibrate else {}
    check_request(ctx)
    read_adapters(ctx)
    read_calibration(ctx)
    if ctx.base_fingerprint != state["base_fingerprint"] or ctx.task != state["task"]:
        raise EdgeloraError(f"adapter {name} ({adapter}) is not for the base stage's model and task; rebuild")
    missing = {t.module for t in ctx.prepared[name].plan.targets} - set(state["modules"])
    if missing:
        raise EdgeloraError(f"adapter {name} targets {sorted(missing)[:3]}, which the base stage did not map; "
                            "rebuild the base stage with every task's adapter")
    with scratch_dir(out) as work:
        folder = work / "folder"
        _copy_tree(base_dir / "base", folder / "base")
        ctx.out, ctx.work = folder, work
        ctx.base_result = _base_result(ctx, base_dir, folder, state)
        export_tasks(ctx)
        task = ctx.tasks[name]
        for rel in (delta_path(name), ort_adapter_path(name), task_engine_path(name)):
            if (folder / rel).exists():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder / rel, out / rel)
    assert task.entry is not None
    record = {"stage_format": STAGE_FORMAT, "name": name, "report": task.report, "entry": task.entry.to_json(),
              "not_swappable": task.not_swappable, "engine": task.engine, "engine_io": task.engine_io,
              "failures": ctx.failures}
    if task.runtime_reference is not None:
        save_float32_safetensors({"logits": np.ascontiguousarray(task.runtime_reference, np.float32)},
                                 out / TASK_REFERENCE, {"format": str(STAGE_FORMAT)})
    if task.conformance is not None:
        record["conformance"] = {"outputs": sorted(task.conformance.outputs), "positions": task.conformance.positions}
        save_tensors(reference_tensors({name: task.conformance}), out / TASK_CONFORMANCE, {"format": str(STAGE_FORMAT)})
    (out / TASK_STATE).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def _task_conformance(task_dir: Path, name: str, record: dict[str, Any]) -> Reference | None:
    """A task stage's reference vectors (None for a stage written without them)."""
    path, spec = task_dir / TASK_CONFORMANCE, record.get("conformance")
    if spec is None or not path.is_file():
        return None
    conf = ConformanceSpec(path.name, "pytorch", ConformanceTolerance(0.0, 0.0, 0.0),
                           {name: ConformanceTask(tuple(spec["outputs"]), spec["positions"])})
    return parse_references(path.read_bytes(), conf, str(path))[name]


def task_state(task_dir: Path) -> dict[str, Any]:
    """A task stage's report row and failures (what the build's gates read)."""
    return _read_state(task_dir / TASK_STATE)


def base_state(base_dir: Path) -> dict[str, Any]:
    return _read_state(base_dir / BASE_STATE)


# ---------------------------------------------------------------------------------------------- 3. the folder
def assemble(base_dir: Path, task_dirs: Mapping[str, Path], target: Target, output: Path, *, threads: int = 1,
             progress: Progress | None = None) -> dict[str, Any]:
    """The deployment folder ``output`` (replaced atomically) from one base stage and its tasks' stages; returns
    its report (``failures`` lists every check that missed its tolerance, stages' included)."""
    from safetensors.numpy import load_file

    state = _read_state(base_dir / BASE_STATE)
    ctx = _context(state["base_path"], {}, target, output, {}, threads, 0, progress)
    _restore_ctx(ctx, state)
    ctx.failures = list(state["failures"])
    with atomic_output_dir(output, force=True) as out, scratch_dir(out) as work:
        ctx.out, ctx.work = out, work
        _copy_tree(base_dir / "base", out / "base")
        ctx.base_result = _base_result(ctx, base_dir, out, state, plan_patches=False)
        for name, task_dir in task_dirs.items():
            record = _read_state(task_dir / TASK_STATE)
            for sub in ("tasks", "base"):
                if (task_dir / sub).is_dir():
                    _copy_tree(task_dir / sub, out / sub)
            ref = task_dir / TASK_REFERENCE
            t = TaskResult(name, None, {}, {}, record["not_swappable"], engine=record["engine"],
                           engine_io=record["engine_io"], report=record["report"],
                           runtime_reference=load_file(str(ref))["logits"] if ref.exists() else None,
                           entry=parse_section("task", record["entry"], str(task_dir / TASK_STATE), name),
                           conformance=_task_conformance(task_dir, name, record))
            ctx.tasks[name] = t
            ctx.failures += record["failures"]
        for step in (convert_mobile, write_conformance, write_manifest, check_runtime, choose_runtime_mode,
                     check_conformance, write_report):
            step(ctx)
    return ctx.report
