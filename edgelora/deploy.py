"""The deployment folder (``edgelora export -o OUT``): its layout, manifest and delta files.

::

    OUT/
      manifest.json            format, base fingerprint, target, io spec, tasks, name map, and the size and
                               sha256 of every other file (reports excepted); read by edgelora.format
      base/model.onnx          the base engine (target precision); weights in base/model.onnx.data
      base/swap.onnx           a base graph with the LoRA-target weights as inputs (the runtime's engine;
                               fp32: the unfused graph, sharing base/lora.onnx.data; else the base engine,
                               sharing base/model.onnx.data)
      base/swap_w0.safetensors the pristine fp32 W0 of those weights (the runtime rebuilds W0 + s·B·A from it)
      base/lora.onnx           the same, unfused, with LoRA branches whose A, B are graph inputs
      tasks/NAME/delta.safetensors   A, B per module (fp32) + head tensors; scales, base fingerprint and
                               label names in its metadata
      tasks/NAME/model.onnx    the baked (merged) engine, when the target bakes them
      tasks/NAME/adapter.onnx_adapter  the delta as ONNX Runtime adapter parameters for base/lora.onnx
      tokenizer/               the base's tokenizer files
      report.json, report.md   parity, sizes, latency

Only numpy, json and safetensors' numpy API here: the on-device runtime reads these files too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .format.manifest import FORMAT_VERSION, MANIFEST
from .lora import DeltaModule

BASE_ENGINE = "base/model.onnx"
BASE_DATA = "model.onnx.data"  # external data of the base engine, shared by the swap graph
SWAP_ENGINE = "base/swap.onnx"
SWAP_W0 = "base/swap_w0.safetensors"
LORA_ENGINE = "base/lora.onnx"  # the base with LoRA branches whose A, B are inputs
LORA_DATA = "lora.onnx.data"  # its external data, shared by the fp32 swap graph
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TOKENIZER_DIR = "tokenizer"


def task_dir(name: str) -> str:
    return f"tasks/{name}"


def delta_path(name: str) -> str:
    return f"tasks/{name}/delta.safetensors"


def task_engine_path(name: str) -> str:
    return f"tasks/{name}/model.onnx"


def ort_adapter_path(name: str) -> str:
    return f"tasks/{name}/adapter.onnx_adapter"


def write_delta(path: Path, modules: Mapping[str, DeltaModule], head: Mapping[str, np.ndarray],
                base_fingerprint: str, labels: Sequence[str] | None = None) -> None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    save_float32_safetensors(tensors, path, meta)


def save_float32_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file byte for byte the same for the same input (sorted header, sorted data).

    (``safetensors.numpy.save_file`` orders its metadata by hash, so two exports of the same adapter
    would differ; re-running an export must be harmless and reproducible.)
    """
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        chunks.append(a.tobytes())
        offset += a.nbytes
    header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)


def read_delta(path: Path) -> tuple[dict[str, DeltaModule], dict[str, np.ndarray]]:
    """(modules, head tensors) of a delta file; memory-mapped by safetensors."""
    from safetensors import safe_open

    modules: dict[str, DeltaModule] = {}
    head: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        scales = json.loads(meta.get("scales", "{}"))
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.startswith("head."):
                head[key[len("head."):]] = f.get_tensor(key)
        for name, scale in scales.items():
            modules[name] = DeltaModule(name, f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B"),
                                        float(scale))
    return modules, head


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as raw JSON, for tools reading a folder this edgelora wrote (the runtime reads it typed
    and checked: ``edgelora.format.read_manifest``)."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
