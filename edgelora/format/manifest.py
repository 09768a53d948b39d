"""``manifest.json`` as the runtime reads it: typed, and checked field by field before anything uses it.

A deployment folder may come from anywhere. :func:`parse_manifest` turns its JSON into frozen dataclasses
or raises one :class:`DeploymentError` naming the field (``tasks.sst2.delta``), what it holds and what it
must hold: a list where an object belongs, a number where a path belongs, a path that leaves the folder, a
file the ``files`` table does not list. After it returns, every field the runtime uses has its type.

Fields the runtime does not use (report numbers, adapter hashes, the target's quantization recipe) stay
in ``Manifest.raw`` as written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DeploymentError
from .files import FileEntry, check_relative, parse_file_entry, read_bytes
from .location import WeightLocation

FORMAT_VERSION = 3  # 3: sha256 + size of every file, labels in each delta, max_positions of the base
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
SCHEMA = "manifest.schema.json"  # the same rules as JSON Schema, beside this file, for readers in other languages
# how the runtime re-encodes a rebuilt weight (runtime/swap.py; the int8 ones: edgelora/lora/quant.py)
RECIPES = ("float32", "float16", "int8", "int8-reduced", "int8-pairsafe")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KV_CACHES = ("concat", "shared")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EngineIO:
    """How an engine is fed and read: its kind (``encoder``, ``causal-lm``, ``sequence-classification``),
    input and output names, and for decoders the KV cache's geometry."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    # causal-lm: "concat" (present = past + the new positions; feed it back as past) or "shared" (also accepts one
    # preallocated buffer per layer bound as both past and present; attention_mask's length is the total sequence)
    kv_cache: str = "concat"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                **({"kv_cache": self.kv_cache} if self.kv_cache != "concat" else {})}


@dataclass(frozen=True)
class BaseInfo:
    name: str  # the bundled base's name, or the folder it was read from
    fingerprint: str  # sha256 over the base's tensors (edgelora.hashing)
    engine: str
    io: EngineIO
    headless: bool  # encoders: the engine stops at the hidden states; each task's head travels in its delta
    vocab_size: int
    max_positions: int | None  # None: the base has no fixed limit
    hidden_size: int | None  # width of the states a task head reads
    model_type: str = ""
    fused: bool = False  # the engine went through a fusion pass

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "model_type": self.model_type,
                "engine": self.engine, "io": self.io.to_json(), "headless": self.headless, "fused": self.fused,
                "vocab_size": self.vocab_size, "max_positions": self.max_positions, "hidden_size": self.hidden_size}


@dataclass(frozen=True)
class TargetInfo:
    """The target the folder was exported for: the fields the runtime uses, and the whole target as written
    (``spec``: backend, quantization recipe, shapes, tolerances; ``edgelora.target.Target.to_json``)."""

    name: str
    provider: str
    precision: str
    sequence: int  # [shapes] sequence: what engines were verified and timed at
    spec: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return dict(self.spec)


@dataclass(frozen=True)
class LoraGraph:
    engine: str
    inputs: Mapping[str, tuple[str, str]]  # module -> (A input, B input)
    modules: Mapping[str, WeightLocation]

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "inputs": {m: list(v) for m, v in sorted(self.inputs.items())},
                "modules": _locations_json(self.modules)}


@dataclass(frozen=True)
class W0Source:
    """Where a float32 weight's pristine W0 already lies in an engine's external data file: ``length`` bytes
    at ``offset`` of ``file``, little-endian float32, stored transposed relative to how it is fed when
    ``transposed``; ``sha256`` of those bytes (the file as a whole is only size-checked at open)."""

    file: str
    offset: int
    length: int
    sha256: str
    transposed: bool

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "length": self.length, "sha256": self.sha256,
                "transposed": self.transposed}


@dataclass(frozen=True)
class SwapWeight:
    recipe: str  # one of RECIPES
    inputs: Mapping[str, str]  # "weight" (and "scale" for int8) -> graph input name
    shape: tuple[int, int]
    source: W0Source | None = None  # else its W0 is in the swap's ``w0`` safetensors file

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "inputs": dict(self.inputs), "shape": list(self.shape),
                **({"source": self.source.to_json()} if self.source else {})}


@dataclass(frozen=True)
class SwapSpec:
    engine: str
    w0: str | None  # safetensors of the W0 of the weights without a ``source`` (None: every weight has one)
    modules: Mapping[str, WeightLocation]
    weights: Mapping[str, SwapWeight]
    graph: str = ""  # which graph it was made from ("unfused", "base engine")

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "w0": self.w0, "graph": self.graph, "modules": _locations_json(self.modules),
                "weights": {n: w.to_json() for n, w in self.weights.items()}}


@dataclass(frozen=True)
class DeviceProviderSpec:
    """A device execution provider a mobile app asks ONNX Runtime for, and its options (ONNX Runtime's names)."""

    name: str  # XnnpackExecutionProvider, NnapiExecutionProvider, CoreMLExecutionProvider, QNNExecutionProvider
    options: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class MobileSpec:
    """ONNX Runtime Mobile: each engine's ORT-format model (``engines``: the ``.onnx`` path -> its ``.ort``, which
    holds all its weights: ORT format has no external data), the operator config of a minimal build, how the
    models were converted, and the device providers in the app's preference order."""

    engines: Mapping[str, str]
    operators: str | None  # required_operators.config (None in a device bundle: it is read at build time)
    onnxruntime: str  # the converter's version: ORT-format models load on this ONNX Runtime or newer
    optimization_level: str
    optimization_style: str  # "fixed" | "runtime" (replay: session.enable_saved_runtime_optimizations = 1)
    target_platform: str
    providers: tuple[DeviceProviderSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": "ort", "onnxruntime": self.onnxruntime, "optimization_level": self.optimization_level,
                "optimization_style": self.optimization_style, "target_platform": self.target_platform,
                "engines": dict(sorted(self.engines.items())), "operators": self.operators,
                "providers": [p.to_json() for p in self.providers]}


@dataclass(frozen=True)
class ModuleInfo:
    rank: int
    scale: float


@dataclass(frozen=True)
class TaskEntry:
    name: str
    delta: str
    labels: tuple[str, ...] | None
    num_labels: int | None
    swappable: bool
    not_swappable_reason: str | None
    engine: str | None
    engine_io: EngineIO | None
    # what the task is, for people and tools (the runtime reads the delta itself)
    adapter_hash: str | None = None
    adapter_path: str | None = None  # relative to the exporter's working directory, or the folder's name (older
    # folders: the exporting machine's absolute path)
    rank: int = 0
    scale: tuple[float, ...] = ()
    targets: tuple[str, ...] = ()
    modules: Mapping[str, ModuleInfo] = field(default_factory=dict)
    head: tuple[str, ...] = ()
    ort_adapter: str | None = None
    pooling: str = "cls"  # what the head reads: "cls" (pooler_output) or "mean" (of last_hidden_state)

    def to_json(self) -> dict[str, Any]:
        return {"adapter_hash": self.adapter_hash, "adapter_path": self.adapter_path,
                "labels": list(self.labels) if self.labels is not None else None, "num_labels": self.num_labels,
                "rank": self.rank, "scale": list(self.scale), "targets": list(self.targets),
                "modules": {m: {"rank": i.rank, "scale": i.scale} for m, i in self.modules.items()},
                "head": list(self.head), "pooling": self.pooling, "delta": self.delta, "ort_adapter": self.ort_adapter,
                "swappable": self.swappable, "not_swappable_reason": self.not_swappable_reason,
                "engine": self.engine, **({"engine_io": self.engine_io.to_json()} if self.engine_io else {})}


@dataclass(frozen=True)
class Manifest:
    format: int
    task: str
    base: BaseInfo
    target: TargetInfo
    tokenizer: str | None
    name_map: Mapping[str, WeightLocation]
    lora_graph: LoraGraph | None
    swap: SwapSpec | None
    tasks: Mapping[str, TaskEntry]
    files: Mapping[str, FileEntry]
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    edgelora_version: str = ""
    name_map_graph: str = ""  # the graph the name map was built on ("fused fp32", "fp32")
    swap_unavailable: str | None = None  # why there is no swap graph
    mobile: MobileSpec | None = None  # ORT-format models for ONNX Runtime Mobile (mobile-* targets)
    # decoders on a shared-cache graph: how the runtime runs tasks by default ("swap", "unmerged" or "engines"),
    # chosen by ``edgelora export`` from what it measured on this folder, and why
    runtime_mode: RuntimeMode | None = None
    # reference inputs and each task's expected outputs (PyTorch's) with the target's tolerances: what
    # ``Runtime.self_test`` / ``edgelora verify --conformance`` re-run on the machine that holds the folder
    conformance: ConformanceSpec | None = None
    conformance_unavailable: str | None = None  # why the folder has no reference vectors

    def to_json(self) -> dict[str, Any]:
        """The manifest.json this describes (``parse_manifest(m.to_json())`` gives ``m`` back)."""
        return {"format": self.format, "edgelora_version": self.edgelora_version, "task": self.task,
                "base": self.base.to_json(), "target": self.target.to_json(), "tokenizer": self.tokenizer,
                "name_map": {"graph": self.name_map_graph, "modules": _locations_json(self.name_map)},
                "lora_graph": self.lora_graph.to_json() if self.lora_graph else None,
                "swap": self.swap.to_json() if self.swap else None, "swap_unavailable": self.swap_unavailable,
                "tasks": {n: t.to_json() for n, t in self.tasks.items()},
                **({"mobile": self.mobile.to_json()} if self.mobile else {}),
                **({"runtime_mode": self.runtime_mode.to_json()} if self.runtime_mode else {}),
                **({"conformance": self.conformance.to_json()} if self.conformance else {}),
                **({"conformance_unavailable": self.conformance_unavailable} if self.conformance_unavailable
                   else {}),
                "files": {rel: e.to_json() for rel, e in self.files.items()}}


def _locations_json(locations: Mapping[str, WeightLocation]) -> dict[str, Any]:
    return {m: loc.to_json() for m, loc in sorted(locations.items())}


def read_manifest(folder: Path) -> Manifest:
    """``folder/manifest.json``, read (a regular file, bounded size) and parsed by :func:`parse_manifest`."""
    data = read_bytes(folder, MANIFEST, "manifest.json", None, limit=MAX_MANIFEST_BYTES)
    where = str(folder / MANIFEST)
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DeploymentError(f"{where}: not valid JSON ({str(exc)[:80]}); re-export the folder") from None
    return parse_manifest(raw, where)


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """Check every field the runtime uses; one-line :class:`DeploymentError` naming the first bad one."""
    top = _Fields(raw, "", where)
    fmt = top.get("format", _is_int, "an integer")
    if fmt != FORMAT_VERSION:
        raise DeploymentError(f"{where}: format {fmt}, this runtime reads {FORMAT_VERSION}; re-export with this "
                              "edgelora version")
    files = {check_relative(rel, f"files[{rel!r:.40}]", where): parse_file_entry(v, f"files.{rel}", where)
             for rel, v in top.sub("files").d.items()}
    base = _base(top.sub("base"))
    target = top.sub("target")
    shapes = target.sub("shapes")
    tgt = TargetInfo(target.text("name"), target.text("provider"), target.text("precision"),
                     shapes.get("sequence", lambda v: _is_int(v) and v >= 1, "a positive integer"), target.d)
    name_map_f = top.sub("name_map")
    name_map = _locations(name_map_f.sub("modules"))
    lora = _lora_graph(top.sub("lora_graph")) if top.has("lora_graph") else None
    swap = _swap(top.sub("swap")) if top.has("swap") else None
    tasks_f = top.sub("tasks")
    tasks = {name: _task(name, tasks_f.sub(name)) for name in tasks_f.d}
    tokenizer = top.path("tokenizer") if top.has("tokenizer") else None
    manifest = Manifest(fmt, top.text("task"), base, tgt, tokenizer, name_map, lora, swap, tasks, files, raw,
                        top.get("edgelora_version", _is_str, "a string", optional=True, default=""),
                        name_map_f.get("graph", _is_str, "a string", optional=True, default=""),
                        top.get("swap_unavailable", _is_str, "a string", optional=True),
                        _mobile(top.sub("mobile")) if top.has("mobile") else None,
                        _runtime_mode(top.sub("runtime_mode")) if top.has("runtime_mode") else None,
                        _conformance(top.sub("conformance"), set(tasks)) if top.has("conformance") else None,
                        top.get("conformance_unavailable", _is_str, "a string", optional=True))
    _check_listed(manifest, where)
    return manifest


def parse_section(kind: str, raw: Any, where: str, name: str = "") -> Any:
    """One section of a manifest on its own (``lora_graph``, ``swap``, ``task``, ``locations``, ``io``), checked
    as :func:`parse_manifest` checks it: ``edgelora build`` passes them between the stages of an export."""
    f = _Fields(raw, kind, where)
    parsers = {"lora_graph": _lora_graph, "swap": _swap, "locations": _locations, "io": _io,
               "task": lambda f: _task(name, f)}
    return parsers[kind](f)


# ---------------------------------------------------------------------------------------------- sections
RUNTIME_MODES = ("swap", "unmerged", "engines")


@dataclass(frozen=True)
class RuntimeMode:
    """The mode the runtime opens this folder in by default, why, and the measurements behind it."""

    mode: str
    why: str
    measured: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "why": self.why, "measured": dict(self.measured)}


def _runtime_mode(f: _Fields) -> RuntimeMode:
    measured = f.get("measured", lambda v: isinstance(v, dict), "an object", optional=True, default={})
    return RuntimeMode(f.get("mode", lambda v: v in RUNTIME_MODES, f"one of {', '.join(RUNTIME_MODES)}"),
                       f.get("why", _is_str, "a string", optional=True, default=""), measured)


CONFORMANCE_POSITIONS = ("all", "last")


@dataclass(frozen=True)
class ConformanceTolerance:
    """The target's ``[tolerance]`` the outputs are held to, against PyTorch (not against the building machine's
    engine: int8 kernels legitimately differ between CPUs)."""

    max_abs_diff: float
    min_cosine: float
    min_agreement: float

    def to_json(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine,
                "min_agreement": self.min_agreement}


@dataclass(frozen=True)
class ConformanceTask:
    """One task's reference vectors in the conformance file: ``{task}/input_ids``, ``{task}/attention_mask``
    (int64, batch × sequence) and ``{task}/{output}`` (float32) for each of ``outputs``, PyTorch's values at
    every position (``"all"``) or at the last position only (``"last"``: decoders, whose logits over a whole
    vocabulary at every position would weigh megabytes); ``{task}/{output}:without_lora`` the same with the
    task's head on W0 (``format/conformance.py``)."""

    outputs: tuple[str, ...]
    positions: str = "all"

    def to_json(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), "positions": self.positions}


@dataclass(frozen=True)
class ConformanceSpec:
    """``conformance.safetensors``: reference inputs and each task's expected outputs computed by PyTorch (the
    export's fp32 merged model), and the tolerances they are held to wherever the folder runs."""

    file: str
    reference: str  # who computed the expected outputs ("pytorch")
    tolerance: ConformanceTolerance
    tasks: Mapping[str, ConformanceTask]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "reference": self.reference, "tolerance": self.tolerance.to_json(),
                "tasks": {n: t.to_json() for n, t in sorted(self.tasks.items())}}


def _conformance(f: _Fields, task_names: set[str]) -> ConformanceSpec:
    tol = f.sub("tolerance")
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v, "a number")
    tolerance = ConformanceTolerance(*(float(tol.get(k, *number)) for k in ("max_abs_diff", "min_cosine",
                                                                              "min_agreement")))
    tasks_f = f.sub("tasks")
    tasks = {}
    for name in tasks_f.d:
        if name not in task_names:
            raise tasks_f.error(name, name, "a task of the manifest's tasks")
        t = tasks_f.sub(name)
        outputs = t.get("outputs", lambda v: isinstance(v, list) and v and all(
            isinstance(x, str) and TASK_NAME.fullmatch(x) for x in v), "a list of output names")
        positions = t.get("positions", lambda v: v in CONFORMANCE_POSITIONS, "'all' or 'last'", optional=True,
                          default="all")
        tasks[name] = ConformanceTask(tuple(outputs), positions)
    return ConformanceSpec(f.path("file"), f.text("reference"), tolerance, tasks)


def _base(f: _Fields) -> BaseInfo:
    fp = f.get("fingerprint", lambda v: isinstance(v, str) and _HEX64.fullmatch(v), "a sha256 hex digest")
    io = _io(f.sub("io"))
    if io.kind not in ("encoder", "causal-lm"):
        raise f.error("io.kind", io.kind, "'encoder' or 'causal-lm'")
    positive = (lambda v: _is_int(v) and v >= 1, "a positive integer")
    return BaseInfo(f.text("name"), fp, f.path("engine"), io, f.get("headless", _is_bool, "true or false"),
                    f.get("vocab_size", *positive), f.get("max_positions", *positive, optional=True),
                    f.get("hidden_size", *positive, optional=True),
                    f.get("model_type", _is_str, "a string", optional=True, default=""),
                    f.get("fused", _is_bool, "true or false", optional=True, default=False))


def _io(f: _Fields) -> EngineIO:
    names = (lambda v: isinstance(v, list) and v and all(isinstance(x, str) and x for x in v), "a list of names")
    io = EngineIO(f.text("kind"), tuple(f.get("inputs", *names)), tuple(f.get("outputs", *names)),
                  *(f.get(k, lambda v: _is_int(v) and 0 <= v <= 1 << 16, "an integer in 0..65536")
                    for k in ("num_layers", "num_kv_heads", "head_dim")),
                  f.get("kv_cache", lambda v: v in KV_CACHES, "'concat' or 'shared'", optional=True, default="concat"))
    if io.kind == "causal-lm" and not (io.num_layers and io.num_kv_heads and io.head_dim):
        raise f.error("num_layers", io.num_layers, "positive, with num_kv_heads and head_dim, for a causal-lm")
    return io


def _locations(f: _Fields) -> dict[str, WeightLocation]:
    return {m: WeightLocation.from_json(v, f.name(m), f.where) for m, v in f.d.items()}


def _lora_graph(f: _Fields) -> LoraGraph:
    modules = _locations(f.sub("modules"))
    inputs_f = f.sub("inputs")
    pair = (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v),
            "[A input, B input]")
    inputs = {m: tuple(inputs_f.get(m, *pair)) for m in inputs_f.d}
    if set(inputs) != set(modules):
        raise f.error("inputs", sorted(set(inputs) ^ set(modules))[:2], "one entry per module of lora_graph.modules")
    return LoraGraph(f.path("engine"), inputs, modules)  # type: ignore[arg-type]


def _swap(f: _Fields) -> SwapSpec:
    modules = _locations(f.sub("modules"))
    weights_f = f.sub("weights")
    weights: dict[str, SwapWeight] = {}
    for name in weights_f.d:
        w = weights_f.sub(name)
        recipe = w.text("recipe")
        if recipe not in RECIPES:
            raise w.error("recipe", recipe, f"one of {', '.join(RECIPES)} (a newer edgelora wrote it? update)")
        want = {"weight", "scale"} if recipe.startswith("int8") else {"weight"}
        inputs = w.get("inputs", lambda v, want=want: isinstance(v, dict) and set(v) == want and all(
            isinstance(x, str) and x for x in v.values()), f"an object with {', '.join(sorted(want))} names")
        shape = w.get("shape", lambda v: isinstance(v, list) and len(v) == 2 and all(
            _is_int(x) and x >= 1 for x in v), "two positive integers")
        source = _source(w.sub("source"), recipe, shape) if w.has("source") else None
        weights[name] = SwapWeight(recipe, dict(inputs), (shape[0], shape[1]), source)
    for m, loc in modules.items():
        w8 = weights.get(loc.initializer)
        if w8 is None or w8.shape != loc.shape:
            raise f.error(f"modules.{m}.initializer", loc.initializer, "a weight listed in swap.weights, same shape")
    w0 = f.path("w0") if f.has("w0") else None
    if w0 is None and any(w.source is None for w in weights.values()):
        raise f.error("w0", None, "a W0 file: some weights have no source")
    return SwapSpec(f.path("engine"), w0, modules, weights,
                    f.get("graph", _is_str, "a string", optional=True, default=""))


def _source(f: _Fields, recipe: str, shape: list[int]) -> W0Source:
    if recipe != "float32":
        raise f.error("file", recipe, "a float32 weight's (only float32 W0 is read from an engine's data)")
    length = f.get("length", _is_count, "an integer ≥ 0")
    if length != 4 * shape[0] * shape[1]:
        raise f.error("length", length, f"4 · {shape[0]} · {shape[1]} bytes (the weight's float32 size)")
    return W0Source(f.path("file"), f.get("offset", _is_count, "an integer ≥ 0"), length,
                    f.get("sha256", lambda v: isinstance(v, str) and _HEX64.fullmatch(v), "a sha256 hex digest"),
                    f.get("transposed", _is_bool, "true or false"))


def _mobile(f: _Fields) -> MobileSpec:
    if f.d.get("format") != "ort":
        raise f.error("format", f.d.get("format"), "'ort' (a newer edgelora wrote it? update)")
    engines_f = f.sub("engines")
    engines = {check_relative(rel, f"mobile.engines[{rel!r:.40}]", f.where): engines_f.path(rel)
               for rel in engines_f.d}
    for rel, ort in engines.items():
        if not ort.endswith(".ort"):
            raise engines_f.error(rel, ort, "the path of an ORT-format model (.ort)")
    providers_raw = f.get("providers", lambda v: isinstance(v, list), "a list", optional=True, default=[])
    providers = []
    for i, raw in enumerate(providers_raw):
        p = _Fields(raw, f.name(f"providers[{i}]"), f.where)
        options = p.get("options", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()), "an object of strings")
        providers.append(DeviceProviderSpec(p.text("name"), dict(options)))
    return MobileSpec(engines, f.path("operators") if f.has("operators") else None, f.text("onnxruntime"),
                      f.text("optimization_level"), f.text("optimization_style"), f.text("target_platform"),
                      tuple(providers))


def _task(name: str, f: _Fields) -> TaskEntry:
    if not TASK_NAME.fullmatch(name):
        raise DeploymentError(f"{f.where}: task name {name!r:.40} is not usable (letters, digits, . _ -); re-export")
    labels = f.get("labels", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                   "a list of label names", optional=True)
    num = f.get("num_labels", lambda v: _is_int(v) and v >= 1, "a positive integer", optional=True)
    if labels is not None and num is not None and len(labels) != num:
        raise f.error("labels", labels, f"{num} names (num_labels)")
    reason = f.get("not_swappable_reason", _is_str, "a string", optional=True)
    engine = f.path("engine") if f.has("engine") else None
    io = _io(f.sub("engine_io")) if f.has("engine_io") else None
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    strings = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
    modules_f = f.sub("modules") if f.has("modules") else _Fields({}, f.name("modules"), f.where)
    modules = {m: ModuleInfo(modules_f.sub(m).get("rank", _is_count, "an integer ≥ 0"),
                             float(modules_f.sub(m).get("scale", *number))) for m in modules_f.d}
    return TaskEntry(name, f.path("delta"), tuple(labels) if labels is not None else None, num,
                     f.get("swappable", _is_bool, "true or false", optional=True, default=True), reason, engine, io,
                     f.get("adapter_hash", _is_str, "a string", optional=True),
                     f.get("adapter_path", _is_str, "a string", optional=True),
                     f.get("rank", _is_count, "an integer ≥ 0", optional=True, default=0),
                     tuple(float(x) for x in f.get("scale", lambda v: isinstance(v, list) and all(
                         number[0](x) for x in v), "a list of numbers", optional=True, default=[])),
                     tuple(f.get("targets", *strings, optional=True, default=[])), modules,
                     tuple(f.get("head", *strings, optional=True, default=[])),
                     f.path("ort_adapter") if f.has("ort_adapter") else None,
                     f.get("pooling", lambda v: v in ("cls", "mean"), '"cls" or "mean"', optional=True,
                           default="cls"))


def _check_listed(m: Manifest, where: str) -> None:
    """Every file the runtime may open is in the ``files`` table (so its size and hash are known). The base
    engine is opened only where there is neither a swap nor a branch graph (a device bundle leaves it out)."""
    paths = {} if m.swap or m.lora_graph else {"base.engine": m.base.engine}
    if m.lora_graph:
        paths["lora_graph.engine"] = m.lora_graph.engine
    if m.swap:
        paths["swap.engine"] = m.swap.engine
        if m.swap.w0 is not None:
            paths["swap.w0"] = m.swap.w0
        for name, w in m.swap.weights.items():
            if w.source is not None:
                paths[f"swap.weights.{name}.source.file"] = w.source.file
    for t in m.tasks.values():
        paths[f"tasks.{t.name}.delta"] = t.delta
        if t.engine:
            paths[f"tasks.{t.name}.engine"] = t.engine
        if t.ort_adapter:
            paths[f"tasks.{t.name}.ort_adapter"] = t.ort_adapter
    if m.conformance is not None:
        paths["conformance.file"] = m.conformance.file
    if m.mobile is not None:
        paths = _mobile_paths(m.mobile, paths)
    for fld, rel in paths.items():
        if rel not in m.files:
            raise DeploymentError(f"{where}: {fld} = {rel!r:.60} is not in the files table, so it cannot be "
                                  "checked; re-export the folder")
    if m.tokenizer is not None and f"{m.tokenizer}/tokenizer.json" not in m.files:
        raise DeploymentError(f"{where}: tokenizer = {m.tokenizer!r:.40} has no tokenizer.json in the files table; "
                              "re-export the folder")


def _mobile_paths(mobile: MobileSpec, paths: dict[str, str]) -> dict[str, str]:
    """What must be listed in a folder with ORT-format models: each engine's .ort (a device bundle carries the
    .ort alone, so an engine with one need not be listed itself), the operator config."""
    out = {fld: rel for fld, rel in paths.items() if rel not in mobile.engines}
    out |= {f"mobile.engines.{rel}": ort for rel, ort in mobile.engines.items()}
    if mobile.operators is not None:
        out["mobile.operators"] = mobile.operators
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_count(v: Any) -> bool:
    return _is_int(v) and v >= 0


class _Fields:
    """A JSON object at ``field`` (dotted path) of the manifest at ``where``; typed getters name the field."""

    def __init__(self, value: Any, field: str, where: str) -> None:
        if not isinstance(value, dict):
            raise DeploymentError(f"{where}: {field or 'the manifest'} must be a JSON object, got "
                                  f"{type(value).__name__}; re-export the folder")
        self.d: dict[str, Any] = value
        self.field = field
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.field}.{key}" if self.field else key

    def error(self, key: str, value: Any, what: str) -> DeploymentError:
        return DeploymentError(f"{self.where}: {self.name(key)} = {value!r:.60} must be {what}; re-export the folder")

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def get(self, key: str, check: Callable[[Any], Any], what: str, optional: bool = False, default: Any = None
            ) -> Any:
        if self.d.get(key) is None:
            if optional:
                return default
            raise DeploymentError(f"{self.where}: field {self.name(key)} is missing; re-export the folder")
        value = self.d[key]
        if not check(value):
            raise self.error(key, value, what)
        return value

    def text(self, key: str) -> str:
        return str(self.get(key, lambda v: isinstance(v, str) and v, "a non-empty string"))

    def path(self, key: str) -> str:
        return check_relative(self.get(key, lambda v: isinstance(v, str), "a relative path"), self.name(key),
                              self.where)

    def sub(self, key: str) -> _Fields:
        if key not in self.d:
            raise DeploymentError(f"{self.where}: field {self.name(key)} is missing; re-export the folder")
        return _Fields(self.d[key], self.name(key), self.where)
