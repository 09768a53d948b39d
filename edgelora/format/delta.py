"""Task delta files (``tasks/NAME/delta.safetensors``): one writer, one reader.

A delta holds, in float32: ``{module}.lora_A`` (r, in) and ``{module}.lora_B`` (out, r) per LoRA module and
``head.{name}`` per head tensor; its metadata holds the format, the fingerprint of the base it was made for,
the scale of each module (JSON), the head's label names (JSON) and, for a classifier that reads the mean of
the token states, ``pooling = "mean"`` (format 4: a reader that does not know pooling refuses the file
rather than feeding the head the wrong vector). :func:`parse_delta` checks the file's
structure (safetensors layout, metadata types, float32 only, every tensor accounted for); what it must fit
(a deployment's base, shapes, finiteness) is checked by the runtime's store against the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeltaError
from ..lora import DeltaModule
from .manifest import FORMAT_VERSION
from .safetensors import parse, write

DELTA_FORMATS = ("2", "3", "4")  # 3 adds the task's label names, 4 the head's pooling; all store float32
POOLINGS = ("cls", "mean")  # what a classification head reads (edgelora.base.HeadSpec)
MEAN_POOLING_FORMAT = "4"


@dataclass(frozen=True)
class Delta:
    modules: dict[str, DeltaModule]
    head: dict[str, np.ndarray]
    base_fingerprint: str
    labels: list[str] | None
    pooling: str = "cls"


def write_delta(path: Path, modules: Mapping[str, DeltaModule], head: Mapping[str, np.ndarray],
                base_fingerprint: str, labels: Sequence[str] | None = None, pooling: str = "cls") -> None:
    """A, B in fp32 under ``{module}.lora_A`` / ``.lora_B``; head tensors under ``head.{name}``;
    the scales, the fingerprint of the base it was trained on and the head's label names in the metadata
    (a delta carries everything the runtime needs to run and label its task)."""
    tensors: dict[str, np.ndarray] = {}
    for name, m in modules.items():
        tensors[f"{name}.lora_A"] = np.ascontiguousarray(m.A, dtype=np.float32)
        tensors[f"{name}.lora_B"] = np.ascontiguousarray(m.B, dtype=np.float32)
    for name, t in head.items():
        tensors[f"head.{name}"] = np.ascontiguousarray(t, dtype=np.float32)
    meta = {"format": str(FORMAT_VERSION), "base_fingerprint": base_fingerprint,
            "scales": json.dumps({n: m.scale for n, m in sorted(modules.items())}, sort_keys=True)}
    if labels is not None:
        meta["labels"] = json.dumps(list(labels))
    if pooling != "cls":  # a CLS delta stays the format-3 file every runtime since reads
        meta |= {"format": MEAN_POOLING_FORMAT, "pooling": pooling}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_float32_safetensors(tensors, path, meta)


def read_delta(path: Path) -> tuple[dict[str, DeltaModule], dict[str, np.ndarray]]:
    """(modules, head tensors) of a delta file this edgelora wrote (tools and tests; the runtime validates more)."""
    delta = parse_delta(path.read_bytes(), str(path))
    return delta.modules, delta.head


def read_delta_pooling(path: Path) -> str:
    """What the head of a delta file reads: ``"cls"`` or ``"mean"``."""
    return parse_delta(path.read_bytes(), str(path)).pooling


def parse_delta(data: Any, where: str) -> Delta:
    """A delta's structure from its bytes, or a one-line :class:`DeltaError` naming ``where``."""
    tensors, meta = parse(data, where, DeltaError)
    fingerprint = meta.get("base_fingerprint")
    if fingerprint is None:
        raise DeltaError(f"{where}: no base_fingerprint in its metadata; re-export the task with edgelora export")
    if meta.get("format") not in DELTA_FORMATS:
        raise DeltaError(f"{where}: delta format {meta.get('format')!r:.20}, this edgelora reads "
                         f"{' or '.join(DELTA_FORMATS)}; re-export the task")
    for key, t in tensors.items():
        if t.dtype != np.float32:
            raise DeltaError(f"{where}: tensor {key!r} is {t.dtype}; deltas hold float32 only (an integer or fp16 "
                             "tensor would change the task's outputs); re-export the task")
    scales = _json_meta(meta, "scales", dict, where) or {}
    modules: dict[str, DeltaModule] = {}
    for module, scale in sorted(scales.items()):
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None:
            raise DeltaError(f"{where}: {module!r:.80}.lora_A / .lora_B missing; re-export the task")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale)):
            raise DeltaError(f"{where}: {module}: scale {scale!r:.20} is not a finite number; re-export the task")
        modules[module] = DeltaModule(module, a, b, float(scale))
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    stray = sorted(set(tensors) - {f"{m}.lora_{p}" for m in modules for p in "AB"} - {f"head.{k}" for k in head})
    if stray:
        raise DeltaError(f"{where}: tensor {stray[0]!r} belongs to no module in the 'scales' metadata nor to the "
                         "head; re-export the task")
    labels = _json_meta(meta, "labels", list, where)
    if labels is not None and not all(isinstance(x, str) for x in labels):
        raise DeltaError(f"{where}: metadata 'labels' must be a list of strings; re-export the task")
    pooling = meta.get("pooling", "cls")
    if pooling not in POOLINGS or (pooling != "cls") != (meta["format"] == MEAN_POOLING_FORMAT):
        raise DeltaError(f"{where}: metadata pooling {pooling!r:.20} with format {meta['format']!r}; format "
                         f"{MEAN_POOLING_FORMAT} deltas say pooling 'mean', others none; re-export the task")
    if pooling != "cls" and "classifier.weight" not in head:
        raise DeltaError(f"{where}: pooling {pooling!r} but no head.classifier.weight to read it; re-export the task")
    return Delta(modules, head, fingerprint, labels, pooling)  # type: ignore[arg-type]


def _json_meta(meta: Mapping[str, str], key: str, kind: type, where: str) -> Any:
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        raise DeltaError(f"{where}: metadata {key!r} is not a JSON {kind.__name__}; re-export the task")
    return value


def save_float32_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file of float32 tensors, the same bytes for the same input (``safetensors.write``)."""
    write({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path, metadata)
