"""The adapter store: task deltas read, checked and held in memory, LRU-bounded.

A delta is read whole (it is small: A, B and a head), its bytes checked against the manifest's size and
sha256 for the deployment's own tasks, then validated against the deployment before the task becomes
usable: base fingerprint, every module a LoRA target of the base engine, A (r, in) / B (out, r) shapes,
float32 only, finite values, head shapes and label count. The deployment's tasks are all validated when the
runtime opens; a task evicted by the LRU bound is read again on demand, and must still have the bytes it had.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DeltaError, DeploymentError
from ..format.delta import parse_delta
from ..format.files import FileEntry, open_path, read_bytes, read_fd
from ..lora import DeltaModule
from .heads import HEAD_ROWS

MAX_DELTA_BYTES = 4 << 30


@dataclass(frozen=True)
class TaskDelta:
    name: str
    source: str  # the file it was read from (for messages)
    modules: dict[str, DeltaModule]
    head: dict[str, np.ndarray]
    labels: tuple[str, ...] | None
    sha256: str  # of the bytes it was read from: a re-read after eviction must find the same
    engine: str | None = None  # the deployment's baked engine of exactly this delta (its own tasks only)
    swappable: bool = True  # False: not a pure W0 + s·B·A update (DoRA, LoRA bias): runs on ``engine`` only
    # the task's swapped weights in their int8 encoding (input name -> array), filled by its first rebuild: a later
    # switch to the task copies them instead of re-quantizing (``swap.SwapWeights.build``); lives and dies with it
    encoded: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    pooling: str = "cls"  # what the classifier reads: "cls" (pooler_output) or "mean" (of last_hidden_state)

    @property
    def head_rows(self) -> int | None:
        return next((int(self.head[w].shape[0]) for w, _ in HEAD_ROWS if w in self.head), None)


@dataclass(frozen=True)
class DeltaRules:
    """What a delta must fit: the base's fingerprint, the LoRA targets' (in, out), the head's input width."""

    fingerprint: str
    dims: Mapping[str, tuple[int, int]]
    hidden_size: int | None


def parse_task_delta(name: str, data: bytes, where: str, rules: DeltaRules,
                     labels: Sequence[str] | None = None) -> TaskDelta:
    """Validate one delta file's bytes against the deployment. ``labels``: names given by the caller (else the
    file's own)."""
    delta = parse_delta(data, where)
    if delta.base_fingerprint != rules.fingerprint:
        raise DeltaError(f"{where}: made for base {delta.base_fingerprint[:12]}…, this deployment's base is "
                         f"{rules.fingerprint[:12]}…; export the adapter against this base")
    for module, d in delta.modules.items():
        _check_module(module, d, rules.dims, where)
    rows = _check_head(delta.head, rules.hidden_size, where)
    names = list(labels) if labels is not None else delta.labels
    if names is not None and (rows is None or len(names) != rows):
        raise DeltaError(f"{where}: {len(names)} label names for a head of {rows or 'no'} outputs; give one "
                         "name per output")
    return TaskDelta(name, where, delta.modules, delta.head, tuple(names) if names is not None else None,
                     hashlib.sha256(data).hexdigest(), pooling=delta.pooling)


def _check_module(module: str, d: DeltaModule, dims: Mapping[str, tuple[int, int]], where: str) -> None:
    if module not in dims:
        raise DeltaError(f"{where}: module {module!r:.80} is not a LoRA target of this deployment's base engine; "
                         "export the adapter together with the others so the base maps it")
    a, b = d.A, d.B
    in_dim, out_dim = dims[module]
    if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]
            or a.shape[0] == 0):
        raise DeltaError(f"{where}: {module}: A {list(a.shape)}, B {list(b.shape)} do not fit the base weight "
                         f"(in {in_dim}, out {out_dim}): expected A [r, {in_dim}], B [{out_dim}, r], r ≥ 1")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DeltaError(f"{where}: {module}: A or B holds Inf/NaN; the adapter is broken, retrain it")


def _check_head(head: Mapping[str, np.ndarray], hidden: int | None, where: str) -> int | None:
    """Shapes of the known head tensors (``(rows, hidden)`` weight, ``(rows,)`` bias) and finiteness;
    returns the head's number of outputs (None without a known head)."""
    rows = None
    for weight, bias in HEAD_ROWS:
        if weight not in head:
            if bias in head:
                raise DeltaError(f"{where}: head tensor {bias} without {weight}; re-export the task")
            continue
        w = head[weight]
        if w.ndim != 2 or w.shape[0] == 0 or (hidden is not None and w.shape[1] != hidden):
            raise DeltaError(f"{where}: head tensor {weight} has shape {list(w.shape)}, the base gives "
                             f"{hidden} features: expected [outputs, {hidden}]; export the adapter against this base")
        if bias in head and tuple(head[bias].shape) != (w.shape[0],):
            raise DeltaError(f"{where}: head tensor {bias} has shape {list(head[bias].shape)}, expected "
                             f"[{w.shape[0]}]; re-export the task")
        rows = int(w.shape[0])
    for key, value in head.items():
        if not np.isfinite(value).all():
            raise DeltaError(f"{where}: head tensor {key} holds Inf/NaN; retrain the adapter")
    return rows


@dataclass(frozen=True)
class Source:
    """Where a task's delta comes from: a file of the deployment (with its manifest entry, baked engine and
    swappability) or one the app loaded; the label names and digest it had when first validated."""

    folder: Path | None
    rel: str
    entry: FileEntry | None = None
    engine: str | None = None
    swappable: bool = True
    labels: tuple[str, ...] | None = None
    sha256: str | None = None

    def read(self) -> tuple[bytes, str]:
        try:
            if self.folder is not None:
                return read_bytes(self.folder, self.rel, "delta file", self.entry), str(self.folder / self.rel)
            with open_path(Path(self.rel), "delta file") as (fd, st):
                if st.st_size > MAX_DELTA_BYTES:
                    raise DeltaError(f"{self.rel}: {st.st_size} bytes is not a delta file; pass a delta.safetensors")
                data = read_fd(fd)
        except DeltaError:
            raise
        except DeploymentError as exc:
            raise DeltaError(str(exc)) from None
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256:
            raise DeltaError(f"{self.rel}: the delta file changed since it was loaded; load it again")
        return data, self.rel

    def validate(self, name: str, rules: DeltaRules) -> TaskDelta:
        data, where = self.read()
        delta = parse_task_delta(name, data, where, rules, self.labels)
        return replace(delta, engine=self.engine, swappable=self.swappable)


class AdapterStore:
    """Known tasks (name -> where their delta is) and the resident ones (validated, in memory), LRU-bounded."""

    def __init__(self, rules: DeltaRules, max_resident: int | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1 (or None for no bound)")
        self.rules = rules
        self.max_resident = max_resident
        self._sources: dict[str, Source] = {}
        self._resident: OrderedDict[str, TaskDelta] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def add_file(self, name: str, folder: Path, rel: str, entry: FileEntry, engine: str | None = None,
                 swappable: bool = True) -> TaskDelta:
        """A task of the deployment: read, checked against its manifest entry, validated and kept."""
        source = Source(folder, rel, entry, engine, swappable)
        delta = source.validate(name, self.rules)
        self.put(name, source, delta)
        return delta

    def read(self, name: str, path: str | Path, labels: Sequence[str] | None = None) -> tuple[Source, TaskDelta]:
        """A delta file the app names, read and validated (not kept yet: see :meth:`put`)."""
        source = Source(None, str(path), labels=tuple(labels) if labels is not None else None)
        return source, source.validate(name, self.rules)

    def put(self, name: str, source: Source, delta: TaskDelta, protect: str | None = None,
            only_if: Source | None = None) -> None:
        """Keep ``delta`` under ``name`` (replacing a task of that name), evicting beyond the LRU bound.
        ``only_if``: keep it only while ``name`` still comes from that source (a re-read racing an unload or a
        load of the same name must not bring the old file back)."""
        with self._lock:
            if only_if is not None and self._sources.get(name) is not only_if:
                return
            # a re-read after eviction must give these bytes, and the labels they were validated with
            self._sources[name] = replace(source, labels=delta.labels, sha256=delta.sha256)
            self._resident[name] = delta
            self._resident.move_to_end(name)
            self._evict(protect)

    def get(self, name: str, protect: str | None = None) -> TaskDelta:
        with self._lock:
            if name in self._resident:
                self._resident.move_to_end(name)
                return self._resident[name]
            if name not in self._sources:
                raise KeyError(name)
            source = self._sources[name]
        delta = source.validate(name, self.rules)
        self.put(name, source, delta, protect, only_if=source)
        return delta

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._sources:
                raise KeyError(name)
            del self._sources[name]
            self._resident.pop(name, None)

    def _evict(self, protect: str | None) -> None:
        if self.max_resident is None:
            return
        for victim in list(self._resident):
            if len(self._resident) <= self.max_resident:
                break
            if victim != protect and victim != next(reversed(self._resident)):
                del self._resident[victim]
