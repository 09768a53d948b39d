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


@dataclass(frozen=True)
class Quantization:
    method: str = "none"  # none | dynamic (int8) | matmul_nbits (int4)
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "qint8"  # qint8 | quint8
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
    quantization: Quantization = field(default_factory=Quantization)
    shapes: Shapes = field(default_factory=Shapes)
    tolerance: Tolerance = field(default_factory=Tolerance)
    source: str = ""  # the file it was read from

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quantization", "shapes",
                                                                                       "tolerance", "source")}
        for sub in ("quantization", "shapes", "tolerance"):
            out[sub] = {f.name: getattr(getattr(self, sub), f.name) for f in fields(getattr(self, sub))}
        return out


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
    required = {"name": str, "backend": str, "provider": str, "precision": str, "opset": int}
    optional = {"description": str, "optimize": bool, "bake_task_engines": bool, "lora_graph": bool}
    for key in data:
        if key not in required and key not in optional:
            raise EdgeloraError(f"{where}: unknown field '{key}'; known fields: "
                                f"{', '.join([*required, *optional, *subs])}")
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
        (t.quantization.method in ("none", "dynamic", "matmul_nbits"),
         f"[quantization] method = {t.quantization.method!r}; choose none, dynamic or matmul_nbits"),
        (t.precision != "int8" or t.quantization.method == "dynamic",
         "precision = 'int8' needs [quantization] method = 'dynamic'"),
        (t.precision != "int4" or t.quantization.method == "matmul_nbits",
         "precision = 'int4' needs [quantization] method = 'matmul_nbits'"),
        (t.precision != "int4" or t.opset >= 21, f"precision = 'int4' needs opset ≥ 21 (got {t.opset})"),
        (t.precision in ("int8", "int4") or t.quantization.method == "none",
         f"[quantization] method = {t.quantization.method!r} needs precision int8 or int4"),
        (t.quantization.weight_type in ("qint8", "quint8"),
         f"[quantization] weight_type = {t.quantization.weight_type!r}; choose qint8 or quint8"),
        (t.quantization.block_size in BLOCK_SIZES,
         f"[quantization] block_size = {t.quantization.block_size}; choose one of {', '.join(map(str, BLOCK_SIZES))}"),
        (t.quantization.eight_bit_block_size in (0, *BLOCK_SIZES),
         f"[quantization] eight_bit_block_size = {t.quantization.eight_bit_block_size}; choose 0 (= block_size) "
         f"or one of {', '.join(map(str, BLOCK_SIZES))}"),
        (t.quantization.accuracy_level in (0, 1, 2, 3, 4),
         f"[quantization] accuracy_level = {t.quantization.accuracy_level}; choose 0..4"),
        (t.shapes.batch >= 1 and t.shapes.sequence >= 2, "[shapes] batch must be ≥ 1 and sequence ≥ 2"),
        (t.tolerance.max_abs_diff > 0 and 0 < t.tolerance.min_cosine <= 1 and 0 <= t.tolerance.min_agreement <= 1,
         "[tolerance] needs max_abs_diff > 0, min_cosine in (0, 1], min_agreement in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise EdgeloraError(f"{where}: {msg}")
    return t
