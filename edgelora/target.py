"""Deployment targets: ``targets/*.toml`` loaded into a frozen, validated dataclass.

A target names the backend and execution provider, the precision and its quantization recipe, the
opset, the shapes used to verify and time engines, the tolerances an engine must meet against
PyTorch, and whether per-task merged engines are baked. ``--target`` takes a bundled name
(``cpu-int8``) or the path of the user's own file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .converters import backend_names
from .errors import EdgeloraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
DEFAULT_TARGET = "cpu-fp32"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what ONNX Runtime's MatMulNBits quantizer (MLAS) accepts
DECODER_GRAPHS = ("trace", "genai-builder")
# ONNX Runtime's ORT-format converter (onnxruntime.tools.convert_onnx_models_to_ort): its optimization levels,
# styles and target platforms
ORT_LEVELS = ("basic", "extended", "all")
ORT_STYLES = ("fixed", "runtime")
ORT_PLATFORMS = ("arm", "amd64")


@dataclass(frozen=True)
class Quantization:
    method: str = "none"  # none | dynamic (int8) | matmul_nbits (int4)
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "qint8"  # qint8 | quint8
    # int8 (qint8 weights): re-encode every integer MatMul's weight so each pair of rows sums to |q| ≤ 128
    # (edgelora.lora.quant, recipe int8-pairsafe): exact on AVX2 CPUs without VNNI, whose u8·s8 kernels add
    # pairs of products in saturating 16-bit lanes, at full VNNI/AMX speed elsewhere
    pair_safe: bool = False
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_embeddings: bool = True
    # int4 only: MatMuls whose node name contains one of these stay at 8 bits (MatMulNBits bits=8,
    # symmetric), in blocks of eight_bit_block_size (0: the same as block_size).
    eight_bit_nodes: tuple[str, ...] = ()
    eight_bit_block_size: int = 0
    # int4 only: when the embedding table equals the LM head's weight (tied embeddings), store it once:
    # the embedding Gather reads the head's quantized tensor (GatherBlockQuantized).
    tie_embeddings: bool = True
    # decoder_graph = "genai-builder" only: MatMul groups the model builder keeps at another width than the int4
    # body (its ``matmul_mixed_precision``, e.g. "last_matmul:int8" keeps the LM head at 8 bits); "" for none
    mixed_precision: str = ""
    # static (int8 QDQ) only, see converters/onnx/calibrate.py: the calibrator (minmax | entropy | percentile),
    # how many calibration texts and held-out check texts per task, the activations' type, MatMuls kept float
    # by name, and the sensitivity pass: keep the MatMuls with the largest own error float, one at a time (at most
    # sensitivity_max_float), until each task decides as the fp32 engine on ``sensitivity_agreement`` of its checks
    calibration: str = "minmax"
    calibration_samples: int = 256
    check_samples: int = 256
    activation_type: str = "quint8"  # quint8 | qint8
    float_nodes: tuple[str, ...] = ()
    sensitivity: bool = True
    sensitivity_agreement: float = 0.99
    sensitivity_max_float: int = 8
    kept_nodes: str = "weight_only"  # weight_only (int8 weights, float activations) | float

    @property
    def int8_recipe(self) -> str:
        """How this target's integer MatMul weights are encoded (``edgelora.lora.quant``)."""
        return "int8-reduced" if self.reduce_range else "int8-pairsafe" if self.pair_safe else "int8"


@dataclass(frozen=True)
class Shapes:
    batch: int = 1
    sequence: int = 128


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float = 1e-4
    min_cosine: float = 0.99999
    min_agreement: float = 1.0
    max_accuracy_drop: float = 0.1  # accuracy points, checked with --eval


@dataclass(frozen=True)
class Mobile:
    """``[mobile]``: also write the engines as ONNX Runtime Mobile's ORT-format models (``mobile/*.ort``) and the
    ``required_operators.config`` a minimal ONNX Runtime build takes (``--include_ops_by_config``)."""

    ort: bool = True
    # the converter's graph optimization level, baked into the .ort (ORT-format models are not optimized again
    # when loaded): basic (ONNX operators only), extended (+ ONNX Runtime's contrib fusions), all (+ layout)
    optimization_level: str = "all"
    # fixed: the optimizations applied before saving (CPU / XNNPACK); runtime: basic ones applied, the others
    # saved and replayed on the nodes a compiling provider (NNAPI, CoreML) leaves to the CPU
    optimization_style: str = "fixed"
    target_platform: str = "arm"  # arm: int8 QDQ kept as int8 (session.qdqisint8allowed), no NCHWc layout
    lora_graph: bool = False  # also convert base/lora.onnx (mixed-task batches, ONNX Runtime's LoRA adapters)


# [providers.NAME] tables: a device execution provider and its options, in ONNX Runtime's own option names
@dataclass(frozen=True)
class XnnpackOptions:
    intra_op_num_threads: int = 0  # 0: ONNX Runtime's default

    def provider_options(self) -> dict[str, str]:
        return {"intra_op_num_threads": str(self.intra_op_num_threads)} if self.intra_op_num_threads else {}


@dataclass(frozen=True)
class NnapiOptions:
    use_fp16: bool = False  # let NNAPI compute fp32 models in fp16
    use_nchw: bool = False
    cpu_disabled: bool = False  # never NNAPI's own CPU reference device (nnapi-reference)
    cpu_only: bool = False

    def provider_options(self) -> dict[str, str]:
        names = {"use_fp16": "NNAPI_FLAG_USE_FP16", "use_nchw": "NNAPI_FLAG_USE_NCHW",
                 "cpu_disabled": "NNAPI_FLAG_CPU_DISABLED", "cpu_only": "NNAPI_FLAG_CPU_ONLY"}
        return {flag: "1" for key, flag in names.items() if getattr(self, key)}


@dataclass(frozen=True)
class CoreMLOptions:
    model_format: str = "MLProgram"  # MLProgram | NeuralNetwork
    compute_units: str = "ALL"  # ALL | CPUOnly | CPUAndGPU | CPUAndNeuralEngine
    require_static_input_shapes: bool = False
    enable_on_subgraphs: bool = False

    def provider_options(self) -> dict[str, str]:
        return {"ModelFormat": self.model_format, "MLComputeUnits": self.compute_units,
                "RequireStaticInputShapes": str(int(self.require_static_input_shapes)),
                "EnableOnSubgraphs": str(int(self.enable_on_subgraphs))}


@dataclass(frozen=True)
class QnnOptions:
    backend_path: str = "libQnnHtp.so"  # the Hexagon NPU (HTP); libQnnCpu.so for QNN's CPU backend
    htp_performance_mode: str = "burst"
    enable_htp_fp16_precision: bool = True  # run fp32 graphs in fp16 on the HTP

    def provider_options(self) -> dict[str, str]:
        return {"backend_path": self.backend_path, "htp_performance_mode": self.htp_performance_mode,
                "enable_htp_fp16_precision": str(int(self.enable_htp_fp16_precision))}


# [providers.<key>] -> (ONNX Runtime's provider name, its options)
DEVICE_PROVIDERS: dict[str, tuple[str, type]] = {
    "XNNPACK": ("XnnpackExecutionProvider", XnnpackOptions),
    "NNAPI": ("NnapiExecutionProvider", NnapiOptions),
    "CoreML": ("CoreMLExecutionProvider", CoreMLOptions),
    "QNN": ("QNNExecutionProvider", QnnOptions),
}
COREML_FORMATS = ("MLProgram", "NeuralNetwork")
COREML_UNITS = ("ALL", "CPUOnly", "CPUAndGPU", "CPUAndNeuralEngine")
QNN_PERFORMANCE = ("burst", "balanced", "default", "high_performance", "high_power_saver", "low_balanced",
                   "low_power_saver", "power_saver", "extreme_power_saver", "sustained_high_performance")


@dataclass(frozen=True)
class DeviceProvider:
    """One ``[providers.KEY]`` table: the provider a device app asks ONNX Runtime for, and its options."""

    key: str  # XNNPACK | NNAPI | CoreML | QNN
    options: Any  # XnnpackOptions | NnapiOptions | CoreMLOptions | QnnOptions

    @property
    def name(self) -> str:
        return DEVICE_PROVIDERS[self.key][0]


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    provider: str
    precision: str
    opset: int
    description: str = ""
    optimize: bool = True
    bake_task_engines: bool = True
    # Also write base/lora.onnx: the base with LoRA as branches whose A, B are inputs (unmerged tasks,
    # mixed-task batches, the bench's unmerged alternative).
    lora_graph: bool = True
    # Decoders only: "trace" (torch.onnx of the HF model, the KV cache concatenated per step) or "genai-builder"
    # (ONNX Runtime GenAI's model builder: GroupQueryAttention with rotary fused, skip/simplified layer norms,
    # fused q/k/v, a KV cache that can be one preallocated buffer shared by past and present)
    decoder_graph: str = "trace"
    quantization: Quantization = field(default_factory=Quantization)
    shapes: Shapes = field(default_factory=Shapes)
    tolerance: Tolerance = field(default_factory=Tolerance)
    mobile: Mobile | None = None  # [mobile]: ORT-format models for ONNX Runtime Mobile
    providers: tuple[DeviceProvider, ...] = ()  # [providers.*]: device providers, in preference order
    source: str = ""  # the file it was read from

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in (
            "quantization", "shapes", "tolerance", "mobile", "providers", "source")}
        for sub in ("quantization", "shapes", "tolerance"):
            out[sub] = _fields_json(getattr(self, sub))
        if self.mobile is not None:
            out["mobile"] = _fields_json(self.mobile)
        if self.providers:
            out["providers"] = {p.key: _fields_json(p.options) for p in self.providers}
        return out


def _fields_json(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def bundled_targets() -> dict[str, Path]:
    folder = resources.files("edgelora.targets")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise EdgeloraError(f"{where} must be a table; see targets/cpu-fp32.toml for the layout")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise EdgeloraError(f"{where}: unknown field '{key}'; known fields: {', '.join(known)}")
        expected = type(getattr(cls(), key)) if cls is not Target else None
        if expected is tuple:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise EdgeloraError(f"{where}.{key} = {value!r} must be a list of strings; fix the value")
            value = tuple(value)
        elif expected is not None and not _type_ok(value, expected):
            raise EdgeloraError(f"{where}.{key} = {value!r} must be {expected.__name__}; fix the value")
        kwargs[key] = value
    return cls(**kwargs)


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def load_target(spec: str | Path) -> Target:
    """A bundled target name or a TOML file path -> validated Target (one-line error otherwise)."""
    spec_str = str(spec)
    bundled = bundled_targets()
    if spec_str in bundled:
        path = bundled[spec_str]
    elif spec_str.endswith(".toml") or Path(spec_str).exists():
        path = Path(spec_str)
        if not path.is_file():
            raise EdgeloraError(f"target file {path} does not exist; pass a bundled target "
                                f"({', '.join(sorted(bundled))}) or a .toml file")
    else:
        raise EdgeloraError(f"unknown target '{spec_str}'; choose one of {', '.join(sorted(bundled))} "
                            "or pass a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeloraError(f"target file {path} is not valid TOML ({exc}); fix the syntax") from None
    return parse_target(data, str(path))


def parse_target(data: dict[str, Any], where: str) -> Target:
    data = dict(data)
    subs = {"quantization": Quantization, "shapes": Shapes, "tolerance": Tolerance}
    kwargs: dict[str, Any] = {"source": where}
    for key, cls in subs.items():
        if key in data:
            kwargs[key] = _section(cls, data.pop(key), f"{where}: [{key}]")
    if "mobile" in data:
        kwargs["mobile"] = _section(Mobile, data.pop("mobile"), f"{where}: [mobile]")
    if "providers" in data:
        kwargs["providers"] = _providers(data.pop("providers"), where)
    required = {"name": str, "backend": str, "provider": str, "precision": str, "opset": int}
    optional = {"description": str, "optimize": bool, "bake_task_engines": bool, "lora_graph": bool,
                "decoder_graph": str}
    for key in data:
        if key not in required and key not in optional:
            raise EdgeloraError(f"{where}: unknown field '{key}'; known fields: "
                                f"{', '.join([*required, *optional, *subs, 'mobile', 'providers'])}")
    for key, typ in {**required, **optional}.items():
        if key not in data:
            if key in required:
                raise EdgeloraError(f"{where}: missing field '{key}'; add it (see targets/cpu-fp32.toml)")
            continue
        if not _type_ok(data[key], typ):
            raise EdgeloraError(f"{where}: field '{key}' = {data[key]!r} must be {typ.__name__}; fix the value")
        kwargs[key] = data[key]
    t = Target(**kwargs)
    checks = [
        (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", t.name) is not None,
         f"name = {t.name!r} must be a plain name (letters, digits, . _ -; it names the default output folder "
         "out/<name>)"),
        (t.backend in backend_names(), f"backend = {t.backend!r}; registered: {', '.join(backend_names())}"),
        (t.provider in PROVIDERS, f"provider = {t.provider!r}; choose one of {', '.join(PROVIDERS)}"),
        (t.precision in PRECISIONS, f"precision = {t.precision!r}; choose one of {', '.join(PRECISIONS)}"),
        (14 <= t.opset <= 23, f"opset = {t.opset}; choose 14..23"),
        (t.quantization.method in ("none", "dynamic", "static", "matmul_nbits"),
         f"[quantization] method = {t.quantization.method!r}; choose none, dynamic, static or matmul_nbits"),
        (t.precision != "int8" or t.quantization.method in ("dynamic", "static"),
         "precision = 'int8' needs [quantization] method = 'dynamic' or 'static'"),
        (t.quantization.calibration in ("minmax", "entropy", "percentile"),
         f"[quantization] calibration = {t.quantization.calibration!r}; choose minmax, entropy or percentile"),
        (t.quantization.activation_type in ("quint8", "qint8"),
         f"[quantization] activation_type = {t.quantization.activation_type!r}; choose quint8 or qint8"),
        (t.quantization.calibration_samples >= 1 and t.quantization.check_samples >= 1,
         "[quantization] calibration_samples and check_samples must be at least 1"),
        (0.0 < t.quantization.sensitivity_agreement <= 1.0,
         "[quantization] sensitivity_agreement must be in (0, 1]"),
        (t.quantization.sensitivity_max_float >= 0, "[quantization] sensitivity_max_float must be at least 0"),
        (t.quantization.kept_nodes in ("weight_only", "float"),
         f"[quantization] kept_nodes = {t.quantization.kept_nodes!r}; choose weight_only or float"),
        (t.quantization.method != "static" or not t.optimize,
         "[quantization] method = 'static' quantizes the unfused graph (ONNX Runtime fuses QDQ at load); set "
         "optimize = false"),
        (t.precision != "int4" or t.quantization.method == "matmul_nbits",
         "precision = 'int4' needs [quantization] method = 'matmul_nbits'"),
        (t.precision != "int4" or t.opset >= 21, f"precision = 'int4' needs opset ≥ 21 (got {t.opset})"),
        (t.precision in ("int8", "int4") or t.quantization.method == "none",
         f"[quantization] method = {t.quantization.method!r} needs precision int8 or int4"),
        (t.quantization.weight_type in ("qint8", "quint8"),
         f"[quantization] weight_type = {t.quantization.weight_type!r}; choose qint8 or quint8"),
        (not t.quantization.pair_safe or (t.quantization.weight_type == "qint8" and not t.quantization.reduce_range),
         "[quantization] pair_safe = true re-encodes qint8 weights at full range; set weight_type = 'qint8' and "
         "reduce_range = false (or pair_safe = false)"),
        (t.quantization.block_size in BLOCK_SIZES,
         f"[quantization] block_size = {t.quantization.block_size}; choose one of {', '.join(map(str, BLOCK_SIZES))}"),
        (t.quantization.eight_bit_block_size in (0, *BLOCK_SIZES),
         f"[quantization] eight_bit_block_size = {t.quantization.eight_bit_block_size}; choose 0 (= block_size) "
         f"or one of {', '.join(map(str, BLOCK_SIZES))}"),
        (t.decoder_graph in DECODER_GRAPHS, f"decoder_graph = {t.decoder_graph!r}; choose one of "
                                            f"{', '.join(DECODER_GRAPHS)}"),
        (t.decoder_graph == "trace" or (t.backend == "onnxruntime" and t.precision in ("fp32", "int4")),
         "decoder_graph = 'genai-builder' is for backend onnxruntime at precision fp32 or int4"),
        (t.quantization.accuracy_level in (0, 1, 2, 3, 4),
         f"[quantization] accuracy_level = {t.quantization.accuracy_level}; choose 0..4"),
        (t.shapes.batch >= 1 and t.shapes.sequence >= 2, "[shapes] batch must be ≥ 1 and sequence ≥ 2"),
        (t.tolerance.max_abs_diff > 0 and 0 < t.tolerance.min_cosine <= 1 and 0 <= t.tolerance.min_agreement <= 1,
         "[tolerance] needs max_abs_diff > 0, min_cosine in (0, 1], min_agreement in [0, 1]"),
    ]
    for ok, msg in checks + _mobile_checks(t):
        if not ok:
            raise EdgeloraError(f"{where}: {msg}")
    return t


def _providers(data: Any, where: str) -> tuple[DeviceProvider, ...]:
    """``[providers.KEY]`` tables, in the file's order (the app's preference order)."""
    if not isinstance(data, dict):
        raise EdgeloraError(f"{where}: providers must be tables [providers.NAME]; NAME one of "
                            f"{', '.join(DEVICE_PROVIDERS)}")
    out = []
    for key, table in data.items():
        if key not in DEVICE_PROVIDERS:
            raise EdgeloraError(f"{where}: [providers.{key}] is not a device provider edgelora knows; choose one of "
                                f"{', '.join(DEVICE_PROVIDERS)}")
        out.append(DeviceProvider(key, _section(DEVICE_PROVIDERS[key][1], table, f"{where}: [providers.{key}]")))
    return tuple(out)


def _mobile_checks(t: Target) -> list[tuple[bool, str]]:
    m, opts = t.mobile, {p.key: p.options for p in t.providers}
    checks = [(not t.providers or m is not None,
               "[providers] lists device providers for ONNX Runtime Mobile; add a [mobile] section (see "
               "targets/mobile-fp32.toml)")]
    if m is not None:
        checks += [
            (t.backend == "onnxruntime", f"[mobile] needs backend = 'onnxruntime' (got {t.backend!r})"),
            (m.ort, "[mobile] ort = false writes nothing for ONNX Runtime Mobile; remove the [mobile] section"),
            (m.optimization_level in ORT_LEVELS,
             f"[mobile] optimization_level = {m.optimization_level!r}; choose one of {', '.join(ORT_LEVELS)}"),
            (m.optimization_style in ORT_STYLES,
             f"[mobile] optimization_style = {m.optimization_style!r}; choose one of {', '.join(ORT_STYLES)}"),
            (m.target_platform in ORT_PLATFORMS,
             f"[mobile] target_platform = {m.target_platform!r}; choose one of {', '.join(ORT_PLATFORMS)}"),
        ]
    if "XNNPACK" in opts:
        checks.append((opts["XNNPACK"].intra_op_num_threads >= 0,
                       "[providers.XNNPACK] intra_op_num_threads must be ≥ 0 (0: ONNX Runtime's default)"))
    if "CoreML" in opts:
        c = opts["CoreML"]
        checks += [(c.model_format in COREML_FORMATS, f"[providers.CoreML] model_format = {c.model_format!r}; "
                    f"choose one of {', '.join(COREML_FORMATS)}"),
                   (c.compute_units in COREML_UNITS, f"[providers.CoreML] compute_units = {c.compute_units!r}; "
                    f"choose one of {', '.join(COREML_UNITS)}")]
    if "QNN" in opts:
        q = opts["QNN"]
        checks += [(q.htp_performance_mode in QNN_PERFORMANCE, f"[providers.QNN] htp_performance_mode = "
                    f"{q.htp_performance_mode!r}; choose one of {', '.join(QNN_PERFORMANCE)}"),
                   (bool(q.backend_path), "[providers.QNN] backend_path must name the QNN backend library "
                    "(libQnnHtp.so, libQnnCpu.so)")]
    return checks
