"""The deployment folder (``edgelora export -o OUT``): where each file lives.

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
      base/task-NAME.onnx      the baked engine of task NAME, when the target bakes them: the base engine's
                               graph with the task's weights (W0 + s·B·A) inline, every other weight read
                               from base/model.onnx.data (a re-exported engine holds all its weights)
      tasks/NAME/adapter.onnx_adapter  the delta as ONNX Runtime adapter parameters for base/lora.onnx
      mobile/NAME.ort          mobile-* targets: each engine the runtime or an app runs (base/model, base/swap,
                               base/task-*; base/lora where asked) as an ONNX Runtime Mobile ORT-format model,
                               all its weights inside (ORT format has no external data)
      mobile/required_operators.config  the operators those models use, for a minimal ONNX Runtime build
      tokenizer/               the base's tokenizer files
      report.json, report.md   parity, sizes, latency

The manifest's ``files`` table and every path field use these names; the runtime takes paths from the
manifest only (checked by :mod:`.files`), never from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .manifest import MANIFEST

__all__ = ["MANIFEST"]

BASE_ENGINE = "base/model.onnx"
BASE_DATA = "model.onnx.data"  # external data of the base engine, shared by the swap graph
SWAP_ENGINE = "base/swap.onnx"
SWAP_W0 = "base/swap_w0.safetensors"
LORA_ENGINE = "base/lora.onnx"  # the base with LoRA branches whose A, B are inputs
LORA_DATA = "lora.onnx.data"  # its external data, shared by the fp32 swap graph
MOBILE_DIR = "mobile"
OPERATORS_CONFIG = "mobile/required_operators.config"  # onnxruntime's build.py --include_ops_by_config
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TOKENIZER_DIR = "tokenizer"


def task_dir(name: str) -> str:
    return f"tasks/{name}"


def delta_path(name: str) -> str:
    return f"tasks/{name}/delta.safetensors"


def task_engine_path(name: str) -> str:
    """Beside the base engine: a patched task engine reads every weight it does not change from
    ``base/model.onnx.data`` (ONNX Runtime takes external data only from the model's own folder)."""
    return f"base/task-{name}.onnx"


def ort_model_path(engine: str) -> str:
    """The ORT-format model of an engine of base/ (``base/swap.onnx`` -> ``mobile/swap.ort``)."""
    return f"{MOBILE_DIR}/{engine.rsplit('/', 1)[-1].removesuffix('.onnx')}.ort"


def ort_adapter_path(name: str) -> str:
    return f"tasks/{name}/adapter.onnx_adapter"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest_json(folder: Path) -> dict[str, Any]:
    """The manifest as raw JSON, for tools reading a folder this edgelora wrote (the runtime reads it typed
    and checked: :func:`edgelora.format.read_manifest`)."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def adapter_record(source: str | Path) -> str:
    """What a manifest records of where an adapter was read from: its path relative to the working directory
    where it lies inside it (``examples/adapters/sst2``: ``edgelora bench`` run there finds it again), else only
    its folder's name; never the exporting machine's absolute path. ``adapter_hash`` identifies the adapter."""
    path = Path(source).resolve()
    cwd = Path.cwd().resolve()
    return path.relative_to(cwd).as_posix() if path != cwd and path.is_relative_to(cwd) else path.name
