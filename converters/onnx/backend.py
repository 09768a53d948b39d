"""The ONNX Runtime backend: what ``edgelora export`` asks of a target whose ``backend = "onnxruntime"``.

- ``build_engine``: torch -> fp32 ONNX (``export``) -> fused where a fusion exists (``optimize``) ->
  quantized or cast for the target (``quantize``);
- ``map_weights``: each LoRA target -> the initializer holding its W0 in the fp32 graph (``names``, by content);
- ``save_base``: ``base/model.onnx`` with its weights in ``base/model.onnx.data``;
- ``branch_graph``: ``base/lora.onnx``, LoRA as branches whose A, B are inputs (``lora``);
- ``swap_graph``: ``base/swap.onnx`` + its pristine W0, the runtime's engine (``swap``);
- ``patch_plan`` / ``bake_patched``: a task engine as the base engine with re-encoded patched weights
  (``patch``), seconds per task, where the plan says it reproduces the quantizer;
- ``write_task_adapter``: a task as ONNX Runtime adapter parameters for ``base/lora.onnx``;
- ``ort_models`` / ``ort_pair``: ONNX Runtime Mobile's ORT-format models and operator config (``mobile``),
  and the sessions that check each ``.ort`` against its ``.onnx``;
- ``session``: an ``InferenceSession`` to verify and time an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.format.delta import save_float32_safetensors
from edgelora.format.layout import BASE_DATA, BASE_ENGINE, LORA_DATA, LORA_ENGINE, SWAP_ENGINE, SWAP_W0
from edgelora.format.manifest import FORMAT_VERSION, LoraGraph, SwapSpec, SwapWeight, W0Source
from edgelora.lora import DeltaModule, stacked_feeds

from .names import NameMapError, WeightLocation


@dataclass(frozen=True)
class EngineBuild:
    """One engine as built in the work folder: at the target's precision (``final``), the fp32 graph the
    name map is built on (``fp32``: fused where a fusion ran), the plain trace (``raw``), its io spec."""

    final: Path
    fp32: Path
    raw: Path
    spec: dict[str, Any]
    fused: bool
    quantization: dict[str, Any] | None = None  # static int8: calibration and sensitivity report


@dataclass
class PatchPlan:
    """The base engine (loaded once, with its weights) and how it stores each LoRA-target initializer."""

    model: Any  # the graph, its weights left in ``data``
    encodings: Mapping[str, Any]
    locations: Mapping[str, WeightLocation]
    data: Path  # base/model.onnx.data


def share_data(model: Any, owner: Path) -> int:
    """Point every initializer of ``model`` (loaded with its data) whose bytes the engine ``owner`` already stores
    in an external data file (same type, shape and sha256) at that file, instead of writing them again: the
    branch graph (unfused) and the base engine (fused where a fusion ran) hold the same embeddings, norms and MLP
    weights. Both engines sit in base/, where ONNX Runtime reads external data. Returns the bytes shared."""
    import hashlib

    import onnx
    from onnx.external_data_helper import uses_external_data

    base = onnx.load(str(owner), load_external_data=False)
    stored: dict[tuple[int, tuple[int, ...], str], list[Any]] = {}
    data_path = owner.parent
    handles: dict[str, Any] = {}
    try:
        for init in base.graph.initializer:
            if not uses_external_data(init):
                continue
            info = {e.key: e.value for e in init.external_data}
            f = handles.get(info["location"]) or handles.setdefault(info["location"],
                                                                     open(data_path / info["location"], "rb"))
            f.seek(int(info.get("offset", 0)))
            digest = hashlib.sha256(f.read(int(info["length"]))).hexdigest()
            stored[(init.data_type, tuple(init.dims), digest)] = list(init.external_data)
    finally:
        for f in handles.values():
            f.close()
    saved = 0
    for init in model.graph.initializer:
        if not init.HasField("raw_data") or len(init.raw_data) < 1024:
            continue
        where = stored.get((init.data_type, tuple(init.dims), hashlib.sha256(init.raw_data).hexdigest()))
        if where is not None:
            saved += len(init.raw_data)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.extend(where)
    return saved


def _w0_source(engine: Path, src: Mapping[str, Any]) -> W0Source:
    """The manifest's pointer to a W0 in the engine's data file, with the sha256 of exactly those bytes."""
    import hashlib

    with open(engine.parent / src["file"], "rb") as f:
        f.seek(src["offset"])
        digest = hashlib.sha256(f.read(src["length"])).hexdigest()
    return W0Source(f"{engine.parent.name}/{src['file']}", src["offset"], src["length"], digest, src["transposed"])


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def build_engine(self, model: Any, task: str, headless: bool, target: Any, work: Path, stem: str,
                     family: str, calibration: Any = None) -> EngineBuild:
        """torch -> fp32 ONNX -> fused -> (quantized; static int8 calibrated on ``calibration``)."""
        from . import export, optimize, quantize

        if task == "causal-lm" and getattr(target, "decoder_graph", "trace") == "genai-builder":
            from . import genai_builder

            final, fp32, raw, spec = genai_builder.build(model, work, stem, target)
            return EngineBuild(final, fp32, raw, spec, True)
        raw = work / f"{stem}.raw.onnx"
        spec = export.export_for_task(model, task, raw, target.opset, headless=headless).to_json()
        fp32, fused = raw, False
        if target.optimize:
            opt = work / f"{stem}.opt.onnx"
            fused = optimize.optimize(raw, opt, family, model.config)
            fp32 = opt if fused else raw
        final = fp32
        if target.precision != "fp32":
            final = work / f"{stem}.{target.precision}.onnx"
            # a classification head stays fp32: a few KB, and the runtime applies it in fp32 beside the base
            exclude = quantize.head_nodes(fp32) if task == "sequence-classification" else ()
            report = quantize.quantize(fp32, final, target, exclude, calibration)
            return EngineBuild(final, fp32, raw, spec, fused, report)
        return EngineBuild(final, fp32, raw, spec, fused)

    def map_weights(self, build: EngineBuild, w0: Mapping[str, np.ndarray]
                    ) -> tuple[dict[str, WeightLocation], dict[str, np.ndarray]]:
        """(module -> location in the fp32 graph, initializer -> its fp32 W0) for the LoRA targets ``w0``
        (module -> W0 (out, in) from torch)."""
        import onnx

        from .names import build_name_map, float_initializers

        proto = onnx.load(str(build.fp32))
        try:
            locations = build_name_map(proto, w0)
        except NameMapError as exc:
            raise EdgeloraError(str(exc)) from None
        wanted = {loc.initializer for loc in locations.values()}
        return locations, {k: v for k, v in float_initializers(proto).items() if k in wanted}

    def save_base(self, build: EngineBuild, out: Path) -> str:
        import onnx

        (out / "base").mkdir(exist_ok=True)
        onnx.save(onnx.load(str(build.final)), str(out / BASE_ENGINE), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=BASE_DATA, size_threshold=1024)
        return BASE_ENGINE

    def branch_graph(self, build: EngineBuild, out: Path, w0: Mapping[str, np.ndarray], target: Any
                     ) -> LoraGraph:
        """base/lora.onnx: the unfused base export with LoRA branches (A, B as inputs), target precision."""
        import onnx

        from . import quantize
        from .lora import add_lora_branches, add_lora_defaults
        from .names import build_name_map

        graph = onnx.load(str(build.raw))
        try:
            locations = build_name_map(graph, w0)
            inputs = add_lora_branches(graph, locations)
        except NameMapError as exc:
            raise EdgeloraError(str(exc)) from None
        fp32 = build.raw.with_name("base.lora.onnx")
        onnx.save(graph, str(fp32))
        final = fp32
        if target.precision != "fp32":  # the branches read graph inputs, so they stay fp32
            final = build.raw.with_name(f"base.lora.{target.precision}.onnx")
            exclude: tuple[str, ...] = ()
            if target.quantization.method == "static":
                # its A, B inputs come at run time: no calibration covers them, so the branch graph (unmerged
                # tasks, mixed batches) takes the same per-channel int8 weights with dynamic activations, and
                # leaves float what the base's sensitivity pass kept out of activation quantization (W1: the
                # GELU-fed output projections; quantized they took SST-2's branch logits to cosine 0.971)
                from dataclasses import replace

                target = replace(target, quantization=replace(target.quantization, method="dynamic"))
                report = build.quantization or {}
                exclude = (*report.get("kept_float", ()), *report.get("kept_float_by_rule", ()),
                           *quantize.head_nodes(fp32))
            quantize.quantize(fp32, final, target, exclude)
        graph = onnx.load(str(final))
        add_lora_defaults(graph)
        # One copy of every weight on disk: the graph the runtime runs by default keeps its weights whole (the
        # branch graph, or the swap graph made from it, for decoders and fp32 encoders; else the base engine),
        # the other points into that data file for the tensors they share (embeddings, norms, MLPs: all but
        # what fusion packed), so a device bundle holds the runtime's data file alone
        runtime_reads_branches = build.spec["kind"] == "causal-lm" or target.precision == "fp32"
        if not runtime_reads_branches:
            share_data(graph, out / BASE_ENGINE)
        onnx.save(graph, str(out / LORA_ENGINE), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=LORA_DATA, size_threshold=1024)
        if runtime_reads_branches:
            base = onnx.load(str(out / BASE_ENGINE))
            share_data(base, out / LORA_ENGINE)
            (out / "base" / BASE_DATA).unlink()
            onnx.save(base, str(out / BASE_ENGINE), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=BASE_DATA, size_threshold=1024)
        return LoraGraph(LORA_ENGINE, {m: (a, b) for m, (a, b) in sorted(inputs.items())}, locations)

    def swap_graph(self, build: EngineBuild, out: Path, target: Any, weights: Mapping[str, np.ndarray],
                   locations: Mapping[str, WeightLocation], branches: LoraGraph | None
                   ) -> tuple[SwapSpec | None, str | None]:
        """base/swap.onnx + base/swap_w0.safetensors, or (None, why) when the base's encoding of a target
        weight cannot be rebuilt on the device (then tasks run unmerged on base/lora.onnx).

        Which graph: fp32 targets swap on the unfused graph (base/lora.onnx without its branches, sharing its
        data file): each LoRA target is its own contiguous weight, so a swap rewrites only those bytes in
        contiguous passes (W1: 7 MB in ~2 ms, where the q/k/v-packed fused weights need ~3 ms), and fp32
        fusion measured within noise of the unfused graph. Quantized and fp16 targets swap on the base
        engine itself (int8: QAttention is 1.08x faster than the unfused int8 graph)."""
        import onnx

        from .lora import remove_lora_branches
        from .names import float_initializers
        from .swap import make_swap_graph

        if not locations:
            return None, "no LoRA targets"
        if target.precision == "fp32" and branches is not None:
            unfused_locs = dict(branches.modules)
            wanted = {loc.initializer for loc in unfused_locs.values()}
            fp32 = {k: v for k, v in float_initializers(onnx.load(str(build.raw))).items() if k in wanted}
            unfused = out / "base" / "unfused.onnx"
            model = onnx.load(str(out / LORA_ENGINE), load_external_data=False)
            remove_lora_branches(model)
            onnx.save(model, str(unfused))  # its tensors still point into lora.onnx.data
            try:
                swap, reason = make_swap_graph(unfused, out / SWAP_ENGINE, fp32, unfused_locs, out_in=True)
            finally:
                unfused.unlink()
            graph = "unfused"
        else:
            swap, reason = make_swap_graph(out / BASE_ENGINE, out / SWAP_ENGINE, dict(weights), dict(locations))
            graph = "base engine"
        if swap is None:
            return None, reason
        # W0 of the float32 weights is read where it already lies (the engine's data file); only the others
        # (fp16, int8: their engine holds no fp32 W0) get a file of their own. Mobile targets: all of them, as
        # the phone ships the ORT-format swap graph, not the .onnx.data it would point into
        mobile = getattr(target, "mobile", None) is not None
        sources = {} if mobile else {n: _w0_source(out / SWAP_ENGINE, src) for n, src in swap.sources.items()}
        rest = {n: w for n, w in swap.w0.items() if n not in sources}
        if rest:
            save_float32_safetensors(rest, out / SWAP_W0, {"format": str(FORMAT_VERSION)})
        weights_spec = {n: SwapWeight(w["recipe"], dict(w["inputs"]), (w["shape"][0], w["shape"][1]), sources.get(n))
                        for n, w in swap.weights.items()}
        return SwapSpec(SWAP_ENGINE, SWAP_W0 if rest else None, dict(sorted(swap.locations.items())), weights_spec,
                        graph), None

    def patch_plan(self, out: Path, weights: Mapping[str, np.ndarray], locations: Mapping[str, WeightLocation]
                   ) -> tuple[PatchPlan | None, str | None]:
        """The saved base engine's graph (its weights left in base/model.onnx.data) and how it encodes each
        LoRA-target initializer, or (None, why) where an encoding cannot be reproduced."""
        import onnx

        from .patch import encodings

        model = onnx.load(str(out / BASE_ENGINE), load_external_data=False)
        encs, reason = encodings(model, weights, out / "base")
        if encs is None:
            return None, reason
        return PatchPlan(model, encs, locations, out / "base" / BASE_DATA), None

    def task_patch_reason(self, lora_kinds: Mapping[str, str], dora: bool, bias: bool,
                          head: Mapping[str, np.ndarray], headless: bool) -> str | None:
        """Why one task cannot be baked by patching (None: it can); see ``patch.task_patch_reason``."""
        from .patch import task_patch_reason

        return task_patch_reason(lora_kinds, dora, bias, head, headless)

    def bake_patched(self, plan: PatchPlan, weights: Mapping[str, np.ndarray], modules: Mapping[str, DeltaModule],
                     layouts: Mapping[str, str], head: Mapping[str, np.ndarray] | None, dst: Path,
                     pooling: str = "cls") -> None:
        """The task engine ``dst`` (beside the base engine): the base engine's graph with the task's weights
        patched in, inline (and its classifier, for a headless encoder); every other weight is read from the
        base engine's data file, so a task costs its changed weights on disk, not a copy of the model."""
        import onnx

        from .patch import patch

        if dst.parent != plan.data.parent:
            raise ValueError(f"{dst}: a patched engine must sit beside {plan.data.name}")  # layout.task_engine_path
        onnx.save(patch(plan.model, plan.encodings, weights, plan.locations, modules, layouts, head, pooling),
                  str(dst))

    def write_task_adapter(self, path: Path, modules: Mapping[str, DeltaModule], branches: LoraGraph) -> None:
        """The task as ONNX Runtime adapter parameters (``onnxruntime.AdapterFormat``) for base/lora.onnx:
        ``RunOptions.add_active_adapter(LoraAdapter)`` then feeds them without the caller passing A, B."""
        import onnxruntime as ort

        from .lora import in_out

        dims = {m: in_out(loc) for m, loc in branches.modules.items()}
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(FORMAT_VERSION)
        fmt.set_model_version(FORMAT_VERSION)
        feeds = stacked_feeds([modules], dims)  # kept alive: the OrtValues borrow these arrays' memory
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt.export_adapter(str(path))

    def ort_models(self, out: Path, work: Path, engines: list[str], mobile: Any) -> Any:
        """``mobile/*.ort`` for ``engines`` + ``mobile/required_operators.config`` (``mobile``)."""
        from .mobile import convert

        return convert(out, work, engines, mobile)

    def ort_pair(self, onnx_path: Path, ort_path: Path, mobile: Any, options: Any, counterpart_options: Any
                 ) -> tuple[Any, Any]:
        """(session on the ``.onnx`` as the converter saw it, session on its ``.ort``) on the CPU: they compute
        the same bytes."""
        import onnxruntime as ort

        from .mobile import counterpart_options as converter_options

        cpu = ["CPUExecutionProvider"]
        opts, disabled = converter_options(mobile, counterpart_options)
        reference = ort.InferenceSession(str(onnx_path), opts, providers=cpu, disabled_optimizers=disabled)
        if mobile.optimization_style == "runtime":
            options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        return reference, ort.InferenceSession(str(ort_path), options, providers=cpu)

    def session(self, path: Path, provider: str, options: Any) -> Any:
        import onnxruntime as ort

        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's own exception types: the converter wrote a graph it cannot load
            first = " ".join(str(exc).split())[:200]
            raise EdgeloraError(f"{path.name}: ONNX Runtime cannot load the engine this export wrote ({first}); "
                                "change the target's quantization options, or report it") from None
