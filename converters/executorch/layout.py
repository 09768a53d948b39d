"""The names inside an ExecuTorch deployment folder (no torch, no executorch: ``edgelora bench`` reads them to
tell such a folder from an ONNX Runtime one)."""

from __future__ import annotations

from typing import Any

from edgelora.format.layout import task_dir

BASE_DATA = "base.ptd"
BRANCH_PROGRAM = "lora.pte"
MANIFEST = "manifest.json"
FORMAT = "edgelora-executorch"
FORMAT_VERSION = 1


def merged_program_path(name: str) -> str:
    return f"{task_dir(name)}/merged.pte"


def is_executorch(manifest: dict[str, Any]) -> bool:
    """Whether a folder's raw manifest is an ExecuTorch folder's (``edgelora export --target executorch-*``)."""
    return manifest.get("format") == FORMAT
