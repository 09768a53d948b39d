"""What the export steps share: the request, and what each step has built so far (typed, not a dict)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..format.conformance import Reference
from ..format.manifest import ConformanceSpec, LoraGraph, MobileSpec, SwapSpec, TaskEntry
from ..lora import DeltaModule
from ..prepare import Prepared
from ..target import Target
from ..verify import Parity


@dataclass
class BaseResult:
    """The base engine and what was derived from it once: the name map, the fp32 W0 of every mapped
    initializer, the branch and swap graphs, and how a task engine is baked from it."""

    build: Any  # the backend's EngineBuild
    engine: str  # path inside the folder
    locations: dict[str, Any]  # module -> WeightLocation (fp32 graph)
    weights: dict[str, np.ndarray]  # initializer -> fp32 W0
    parity: Parity | None = None
    latency_ms: float | None = None
    unfused_latency_ms: float | None = None
    branches: LoraGraph | None = None  # base/lora.onnx
    swap: SwapSpec | None = None  # base/swap.onnx
    swap_reason: str | None = None
    layouts: dict[str, str] = field(default_factory=dict)  # module -> layout its ΔW is computed in
    patch: Any = None  # the backend's PatchPlan, None where tasks are re-exported
    patch_reason: str | None = None
    branch_session: Any = None  # one session on the branch graph for every task's check


@dataclass
class TaskResult:
    """One task: its delta, how its engine was baked, and every check's numbers."""

    name: str
    prepared: Prepared | None  # None where the task was built by another process (edgelora build's cells)
    modules: dict[str, DeltaModule]
    head: dict[str, np.ndarray]
    not_swappable: str | None  # why the runtime cannot apply it as W0 + s·B·A (None: it can)
    ort_adapter: str | None = None  # its ONNX Runtime adapter file
    engine: str | None = None  # its baked engine
    engine_io: dict[str, Any] | None = None  # and how that is fed
    report: dict[str, Any] = field(default_factory=dict)  # the report's task row
    runtime_reference: np.ndarray | None = None  # the baked engine's logits on the runtime check's inputs
    entry: TaskEntry | None = None  # its manifest entry
    conformance: Reference | None = None  # its reference inputs and PyTorch's outputs for them


@dataclass
class ExportContext:
    base: Any  # what the user passed as --base
    adapters: Mapping[str, Path]
    target: Target
    output: Path
    evals: Mapping[str, Path]
    threads: int
    latency_runs: int
    allow_pickle: bool
    step: Callable[[str], None]
    backend: Any = None
    bake: str = "auto"  # "reexport": every task engine exported again from the merged model
    calibrate: Mapping[str, Path] = field(default_factory=dict)  # --calibrate: task ("" = every task) -> texts
    # filled by the steps, in order
    prepared: dict[str, Prepared] = field(default_factory=dict)
    task: str = ""
    base_path: Path | None = None
    base_fingerprint: str = ""
    family: str = ""
    model_config: Any = None  # the base's transformers config
    headless: bool = True
    eval_sets: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)
    out: Path | None = None  # the folder being written (temporary until published)
    work: Path | None = None  # scratch inside it
    base_result: BaseResult | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    mobile: MobileSpec | None = None  # the ORT-format models (mobile-* targets)
    mobile_report: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    started: float = 0.0
    tokenizer: Any = None  # transformers' tokenizer of the base, for --eval
    calibration_texts: dict[str, list[str]] = field(default_factory=dict)  # static int8: task -> its texts
    conformance: ConformanceSpec | None = None  # the reference vectors written into the folder
    conformance_unavailable: str | None = None  # or why there are none
    conformance_report: dict[str, Any] = field(default_factory=dict)  # the self test run on the folder
