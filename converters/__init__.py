"""Backends: how a deployment target's engines are built, one folder each, chosen by the target's ``backend``.

One registry, keyed by the name a target file's ``backend`` field uses. A backend is a class with the methods
of :class:`Backend` (the ONNX Runtime backend, ``converters/onnx/``, is the first); a new one (TensorRT, a
mobile format) adds its folder and one :func:`register_backend` line, and touches nothing else. Entries are
import paths, so reading a target file never imports a backend's heavy dependencies. Installed as
``edgelora.converters``; a backend imports only ``edgelora.format``, ``edgelora.lora``, the target schema
and the errors (``tests/test_layers.py`` holds it to that).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

_BACKENDS: dict[str, str] = {}


class Backend(Protocol):
    """What ``edgelora export`` asks of a backend (each step's docstring in ``converters/onnx/backend.py``)."""

    name: str

    def build_engine(self, model: Any, task: str, headless: bool, target: Any, work: Any, stem: str,
                     family: str) -> Any: ...

    def map_weights(self, build: Any, w0: Any) -> Any: ...

    def save_base(self, build: Any, out: Any) -> str: ...

    def branch_graph(self, build: Any, out: Any, w0: Any, target: Any) -> Any: ...

    def swap_graph(self, build: Any, out: Any, target: Any, weights: Any, branches: Any) -> Any: ...

    def patch_plan(self, out: Any, weights: Any, locations: Any) -> Any: ...

    def bake_patched(self, plan: Any, weights: Any, modules: Any, layouts: Any, head: Any, dst: Any,
                     pooling: str = "cls") -> Any: ...

    def write_task_adapter(self, path: Any, modules: Any, branches: Any) -> None: ...

    def session(self, path: Any, provider: str, options: Any) -> Any: ...


def register_backend(name: str, path: str) -> None:
    """Register a backend class by import path (``"package.module:Class"``) under a target's ``backend`` name."""
    _BACKENDS[name] = path


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name`` (its module imported now)."""
    module, _, cls = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


register_backend("onnxruntime", "edgelora.converters.onnx.backend:OnnxRuntimeBackend")
register_backend("tensorrt", "edgelora.converters.tensorrt.backend:TensorRTBackend")
register_backend("executorch", "edgelora.converters.executorch.backend:ExecuTorchBackend")
