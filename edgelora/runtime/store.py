"""The adapter store: task deltas memory-mapped from safetensors, validated once, LRU-bounded.

``load(name, path)`` checks the file against the deployment (base fingerprint, that every module is a
LoRA target of the base engine, A (r, in) / B (out, r) shapes, finite values, head shapes) before the
task becomes usable; ``get`` maps it back in if it was evicted. Resident tasks hold only memory maps:
their pages cost RAM once read (an ``activate`` reads them).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..deploy import DeltaModule
from .files import DeltaError, mmap_safetensors


@dataclass(frozen=True)
class TaskDelta:
    name: str
    path: Path
    modules: dict[str, DeltaModule]
    head: dict[str, np.ndarray]


def read_task_delta(name: str, path: Path, fingerprint: str, dims: Mapping[str, tuple[int, int]],
                    head_shapes: Mapping[str, tuple[int, ...]] | None = None) -> TaskDelta:
    """Open and validate one delta file. ``dims``: {module: (in, out)} the base engine can take."""
    tensors, meta = mmap_safetensors(path)
    got = meta.get("base_fingerprint")
    if got is None:
        raise DeltaError(f"{path}: no base_fingerprint in its metadata; re-export the task with edgelora export")
    if got != fingerprint:
        raise DeltaError(f"{path}: made for base {got[:12]}…, this deployment's base is {fingerprint[:12]}…; "
                         "export the adapter against this base")
    try:
        scales = json.loads(meta.get("scales", "{}"))
        if not isinstance(scales, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise DeltaError(f"{path}: metadata 'scales' is not a JSON object ({exc}); re-export the task") from None
    modules: dict[str, DeltaModule] = {}
    for module, scale in sorted(scales.items()):
        if module not in dims:
            raise DeltaError(f"{path}: module {module!r} is not a LoRA target of this deployment's base engine; "
                             "export the adapter together with the others so the base maps it")
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None:
            raise DeltaError(f"{path}: {module}.lora_A / .lora_B missing; re-export the task")
        in_dim, out_dim = dims[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise DeltaError(f"{path}: {module}: A {list(a.shape)}, B {list(b.shape)} do not fit the base weight "
                             f"(in {in_dim}, out {out_dim}): expected A [r, {in_dim}], B [{out_dim}, r]")
        if not (isinstance(scale, (int, float)) and np.isfinite(scale)):
            raise DeltaError(f"{path}: {module}: scale {scale!r} is not a finite number; re-export the task")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise DeltaError(f"{path}: {module}: A or B holds Inf/NaN; the adapter is broken, retrain it")
        modules[module] = DeltaModule(module, a, b, float(scale))
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    for key, shape in (head_shapes or {}).items():
        if key in head and tuple(head[key].shape[1:]) != tuple(shape[1:]):
            raise DeltaError(f"{path}: head tensor {key} has shape {list(head[key].shape)}, the base gives "
                             f"{list(shape[1:])} features; export the adapter against this base")
    for key, value in head.items():
        if not np.isfinite(value).all():
            raise DeltaError(f"{path}: head tensor {key} holds Inf/NaN; retrain the adapter")
    return TaskDelta(name, path, modules, head)


class AdapterStore:
    """Known tasks (name -> delta path) and the resident ones (validated, memory-mapped), LRU-bounded."""

    def __init__(self, fingerprint: str, dims: Mapping[str, tuple[int, int]], max_resident: int | None = None,
                 head_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1 (or None for no bound)")
        self.fingerprint = fingerprint
        self.dims = dict(dims)
        self.head_shapes = dict(head_shapes or {})
        self.max_resident = max_resident
        self._paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, TaskDelta] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def register(self, name: str, path: Path) -> None:
        """Known, not read yet (the manifest's tasks: read and validated on first use)."""
        with self._lock:
            self._paths[name] = Path(path)

    def load(self, name: str, path: str | Path, protect: str | None = None) -> TaskDelta:
        """Read and validate now; replaces a task of the same name only if the new file is good."""
        delta = read_task_delta(name, Path(path), self.fingerprint, self.dims, self.head_shapes)
        with self._lock:
            self._paths[name] = Path(path)
            self._resident[name] = delta
            self._resident.move_to_end(name)
            self._evict(protect)
        return delta

    def get(self, name: str, protect: str | None = None) -> TaskDelta:
        with self._lock:
            if name in self._resident:
                self._resident.move_to_end(name)
                return self._resident[name]
            if name not in self._paths:
                raise KeyError(name)
            path = self._paths[name]
        return self.load(name, path, protect)

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise KeyError(name)
            del self._paths[name]
            self._resident.pop(name, None)

    def _evict(self, protect: str | None) -> None:
        if self.max_resident is None:
            return
        for victim in list(self._resident):
            if len(self._resident) <= self.max_resident:
                break
            if victim != protect and victim != next(reversed(self._resident)):
                del self._resident[victim]  # its memory maps close when the last reference goes
