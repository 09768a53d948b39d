"""Rebuilding LoRA-target weights in place: ``W = W0 + s·B·A`` from the pristine ``W0``, per recipe.

The swap graph (``base/swap.onnx``) takes every LoRA-target weight as an input. The runtime owns two
sets of those inputs ("slots"): runs read the active slot while ``activate`` rewrites the other one,
then flips. A slot remembers which weights differ from ``W0``, so a rebuild touches only those and
the new task's: never by subtracting the old task, always ``W0`` + the new delta. The delta of a whole
weight (every LoRA slice of a packed q/k/v weight at once, zeros elsewhere) is one GEMM into a scratch
buffer, then one contiguous ``np.add(W0, ΔW, out=buffer)``: contiguous passes run at memory speed,
where numpy over strided slices measured 2-3x slower. The GEMM is computed in the layout the weight is
fed in (``WeightLocation.transposed``: (in, out), else (out, in), which fp32 swap graphs use), the layout the
exporter merged that weight in, so a rebuilt weight is the baked engine's bit for bit.

Recipes (per weight, from the manifest): ``float32``; ``float16`` (cast); ``int8`` / ``int8-reduced`` /
``int8-pairsafe`` (per-column symmetric int8, ``edgelora.lora.quant``: the last is exact on AVX2 CPUs without
VNNI too), re-applied to the touched columns only — per-column scales make that identical to quantizing the
whole merged weight.

int8 rebuilds keep what they made: a task's first switch re-quantizes its weights (W1: ~4-6 ms, eight passes
over 1.8M values) and leaves the int8 values and scales with the task (``encoded``, 1.8 MB for W1's
q, v: a quarter of the fp32 weights it came from); every later switch to it copies them (one pass over a
quarter of the bytes). ``prepare`` does the first one ahead, when a task is loaded. float32 rebuilds are
already one GEMM and one add, and a copy of their result would cost as much: they keep nothing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from threading import Condition, Lock
from typing import Any

import numpy as np

from ..errors import DeploymentError
from ..format.files import FileEntry, map_file
from ..format.location import WeightLocation
from ..format.manifest import SwapSpec, SwapWeight
from ..format.safetensors import parse
from ..lora import INT8_LEVELS, DeltaModule, int8_per_column, int8_per_column_into, lora_delta_in_out, lora_delta_out_in


@functools.cache
def _openblas_set_threads() -> Callable[[int], int] | None:
    """numpy's OpenBLAS ``openblas_set_num_threads_local`` (sets the thread count, returns the previous one),
    or None where there is no such OpenBLAS (other BLAS, other OS)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
    except OSError:
        return None
    for path in libs:
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


_blas_lock = Lock()
_blas_users = 0
_blas_saved: int | None = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's OpenBLAS at one thread while the block runs, its previous count restored after.

    A swap runs small GEMMs (rank r) on several threads at once; OpenBLAS would fan each out to its own
    threads, which on a 2-core device oversubscribes the cores (measured 2x slower swaps). In OpenBLAS's
    pthreads builds (numpy's wheels) the count is one per process, even through the ``_local`` setter, so
    it is set for the swap only; overlapping swaps (several runtimes) are counted, the last one restores."""
    global _blas_users, _blas_saved
    fn = _openblas_set_threads()
    if fn is None:
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = fn(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved is not None:
                fn(_blas_saved)


@dataclass
class Slot:
    """One set of fed weights: ``arrays`` (input name -> buffer) and the weights that differ from W0."""

    arrays: dict[str, np.ndarray]
    dirty: set[str] = field(default_factory=set)


class SwapWeights:
    """The fed weights, their pristine W0 and the slots (two by default: the active one and one to build the
    next task into; more let an app that names its task per call keep several tasks built). ``threads``:
    workers for a rebuild (numpy releases the GIL in its loops, so weights are rebuilt in parallel)."""

    def __init__(self, weights: Mapping[str, SwapWeight], w0: Mapping[str, np.ndarray],
                 locations: Mapping[str, WeightLocation], threads: int = 1, slots: int = 2) -> None:
        self.spec = dict(weights)
        self.w0 = {k: np.asarray(v) for k, v in w0.items()}  # plain views of the memory map (no subclass per op)
        self.locations = {m: loc for m, loc in locations.items() if loc.initializer in self.spec}
        for name, entry in self.spec.items():
            w = self.w0.get(name)
            if w is None or w.shape != entry.shape or w.dtype != np.float32:
                raise DeploymentError(f"swap W0 file lacks {name} as float32 {list(entry.shape)}; re-run edgelora "
                                      "export")
        self.modules_of: dict[str, list[str]] = {}
        for module, loc in sorted(self.locations.items()):
            self.modules_of.setdefault(loc.initializer, []).append(module)
        self._base = self._encode_all()  # W0 in each recipe's encoding, to reset untouched weights
        self.slots = [Slot({k: np.array(v, copy=True) for k, v in self._base.items()}) for _ in range(max(2, slots))]
        self._scratch: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}  # (share, shape) -> buffer
        self._shares = max(1, threads)
        # the calling thread builds share 0 itself, ``threads - 1`` workers the others: one thread and one
        # wake-up fewer per swap (W1, back to back, this VM on a slow hour: 2.4-2.8 ms vs 2.8-3.1 before)
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="edgelora-swap") if threads > 1 else None

    def add_slot(self) -> int:
        """One more slot, holding W0 (the :class:`SlotPool` adds one where waiting for a slot would never end)."""
        self.slots.append(Slot({k: np.array(v, copy=True) for k, v in self._base.items()}))
        return len(self.slots) - 1

    def dims(self) -> dict[str, tuple[int, int]]:
        return {m: loc.dims() for m, loc in self.locations.items()}

    def _encode_all(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, entry in self.spec.items():
            w0 = np.asarray(self.w0[name], np.float32)
            inputs = entry.inputs
            if entry.recipe == "float32":
                arrays[inputs["weight"]] = w0  # the memory-mapped pristine W0 itself: no extra copy
            elif entry.recipe == "float16":
                arrays[inputs["weight"]] = w0.astype(np.float16)
            else:
                arrays[inputs["weight"]], arrays[inputs["scale"]] = int8_per_column(w0, entry.recipe)
        return arrays

    def build(self, slot: Slot, modules: Mapping[str, DeltaModule],
              encoded: dict[str, np.ndarray] | None = None) -> None:
        """Make ``slot`` hold W0 + the deltas in ``modules`` (and W0 wherever it held another task).
        The weights are dealt into one share per thread; each share has its own scratch buffers. Calls must
        not overlap (the runtime holds its activate lock). ``encoded``: the task's int8 encodings from an
        earlier rebuild, copied where present, filled where not (see the module docstring)."""
        todo = [n for n in self.spec if n in slot.dirty or any(m in modules for m in self.modules_of.get(n, ()))]
        slot.dirty.update(todo)  # a failure half-way leaves these marked for the next rebuild
        jobs = [(name, [m for m in self.modules_of.get(name, ()) if m in modules]) for name in todo]
        # largest weights dealt first, round robin: few futures, balanced bytes
        jobs.sort(key=lambda job: -self.w0[job[0]].size)
        shares = [jobs[k::self._shares] for k in range(self._shares)] if self._pool is not None else [jobs]
        with single_threaded_blas():
            futures = [self._pool.submit(self._build_share, slot, k, share, modules, encoded)  # type: ignore[union-attr]
                       for k, share in enumerate(shares) if k and share]
            try:
                self._build_share(slot, 0, shares[0], modules, encoded)
            finally:
                wait(futures)  # no worker may still write into the slot once this returns or raises
        for f in futures:
            f.result()  # a worker's error

    def _build_share(self, slot: Slot, share: int, jobs: list[tuple[str, list[str]]],
                     modules: Mapping[str, DeltaModule], encoded: dict[str, np.ndarray] | None) -> None:
        for name, mods in jobs:
            if mods and encoded is not None and self._copy_encoded(slot, name, encoded):
                continue
            delta = self._packed_delta(name, mods, modules, self._scratch_for(share, name)) if mods else None
            self._apply(slot, name, mods, delta, share)
            if mods and encoded is not None and self.spec[name].recipe in INT8_LEVELS:
                for key in self.spec[name].inputs.values():  # distinct keys per weight: safe across the workers
                    encoded[key] = slot.arrays[key].copy()

    def prepare(self, modules: Mapping[str, DeltaModule], encoded: dict[str, np.ndarray]) -> None:
        """Fill ``encoded`` with the task's int8 weights now (no slot changes), so its first switch copies too.
        Calls must not overlap with ``build`` (the runtime holds its activate lock)."""
        jobs = [(n, [m for m in self.modules_of.get(n, ()) if m in modules]) for n in self.spec
                if self.spec[n].recipe in INT8_LEVELS and n not in encoded]
        jobs = [job for job in jobs if job[1]]
        if not jobs:
            return
        slot = Slot({k: self._base[k].copy() for n, _ in jobs for k in self.spec[n].inputs.values()})
        with single_threaded_blas():
            self._build_share(slot, 0, jobs, modules, encoded)

    def _copy_encoded(self, slot: Slot, name: str, encoded: Mapping[str, np.ndarray]) -> bool:
        """Copy the task's kept encoding of weight ``name`` into ``slot``; False when it has none."""
        keys = list(self.spec[name].inputs.values())
        if not all(k in encoded for k in keys):
            return False
        for key in keys:
            np.copyto(slot.arrays[key], encoded[key])  # (``build`` has marked the weight dirty)
        return True

    def _contiguous(self, name: str, width: int, share: int) -> np.ndarray:
        key = (-1 - share, (self.w0[name].shape[0], width))
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = np.empty(key[1], np.float32)
        return buf

    def _scratch_for(self, index: int, name: str) -> np.ndarray:
        shape = tuple(self.w0[name].shape)
        buf = self._scratch.get((index, shape))
        if buf is None:
            buf = self._scratch[(index, shape)] = np.empty(shape, np.float32)
        return buf

    def _apply(self, slot: Slot, name: str, mods: list[str], delta: np.ndarray | None, share: int) -> None:
        entry = self.spec[name]
        inputs = entry.inputs
        if delta is None:  # back to W0
            for key in inputs.values():
                np.copyto(slot.arrays[key], self._base[key])
            slot.dirty.discard(name)
            return
        w0 = self.w0[name]
        if entry.recipe == "float32":
            # one contiguous pass, W0 + ΔW (measured: beats row blocks, numpy's per-call cost outweighs the cache win)
            np.add(w0, delta, out=slot.arrays[inputs["weight"]])
            return
        if entry.recipe == "float16":
            np.add(w0, delta, out=delta)
            np.copyto(slot.arrays[inputs["weight"]], delta, casting="same_kind")
            return
        # int8: per-column scales, so only the columns this task touches are re-quantized; the others
        # get W0's encoding back (they may hold the previous task's).
        if any(not self.locations[m].transposed for m in mods):
            raise DeploymentError(f"{name}: int8 swaps need a (in, out) weight; re-run edgelora export")
        q_buf, s_buf = slot.arrays[inputs["weight"]], slot.arrays[inputs["scale"]]
        q_base, s_base = self._base[inputs["weight"]], self._base[inputs["scale"]]
        touched = np.zeros(w0.shape[1], bool)
        for m in mods:
            lo, hi = self.locations[m].slice or (0, w0.shape[1])
            touched[lo:hi] = True
        for lo, hi in _runs(np.flatnonzero(touched)):
            # one strided pass into a contiguous block, then the quantizer's passes run contiguous, in cache
            block = np.add(w0[:, lo:hi], delta[:, lo:hi], out=self._contiguous(name, hi - lo, share))
            s_buf[lo:hi] = int8_per_column_into(block, q_buf[:, lo:hi], entry.recipe)
        if not touched.all():
            for lo, hi in _runs(np.flatnonzero(~touched)):
                np.copyto(q_buf[:, lo:hi], q_base[:, lo:hi])
                s_buf[lo:hi] = s_base[lo:hi]

    def _packed_delta(self, name: str, mods: list[str], modules: Mapping[str, DeltaModule], out: np.ndarray
                      ) -> np.ndarray:
        """ΔW for the whole weight in a scratch buffer: each module's ``s·B·A`` (one small GEMM written straight
        into its slice), zeros in the slices no module of this task touches."""
        shape = out.shape
        axis_len = shape[1] if self.locations[mods[0]].transposed else shape[0]
        covered = np.zeros(axis_len, bool)
        for m in mods:
            d, loc = modules[m], self.locations[m]
            lo, hi = loc.slice or (0, axis_len)
            if loc.transposed:  # W (in, out): ΔW[:, lo:hi] = (Aᵀ (in, r) @ Bᵀ (r, out)) · s
                lora_delta_in_out(d.A, d.B, d.scale, out=out[:, lo:hi])
            else:  # W (out, in): ΔW[lo:hi, :] = (s·B (out, r)) @ A (r, in)
                lora_delta_out_in(d.A, d.B, d.scale, out=out[lo:hi, :])
            covered[lo:hi] = True
        if not covered.all():
            gaps = np.flatnonzero(~covered)
            for lo, hi in _runs(gaps):
                if self.locations[mods[0]].transposed:
                    out[:, lo:hi] = 0.0
                else:
                    out[lo:hi, :] = 0.0
        return out


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive indices."""
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(idx) - 1]])
    return [(int(idx[a]), int(idx[b]) + 1) for a, b in zip(starts, stops, strict=True)]


_UNKNOWN = object()  # what a slot holds after a failed rebuild: nothing usable until rebuilt


class SlotPool:
    """The slots of a :class:`SwapWeights` as tasks see them: what each holds (a delta, ``None`` for W0), how
    many calls read it, and which to rebuild next. A slot being read is never rebuilt; switching to a task a
    slot still holds is a flip, no rebuild. ``cond`` is the runtime's condition (it guards the active state
    too, so a call reads the state and counts itself a reader in one step)."""

    def __init__(self, weights: SwapWeights, cond: Condition) -> None:
        self.weights = weights
        self.cond = cond
        n = len(weights.slots)
        self.readers = [0] * n
        self.stuck = [0] * n  # readers of each slot that wait for the activate lock (see slot_for)
        self.held: list[Any] = [None] * n  # every slot starts as W0
        self.used = [0] * n  # when each slot was last chosen (LRU among the idle ones)
        self.clock = 0

    def slot_for(self, delta: Any, active: int | None, mine: Collection[int] = ()) -> int:
        """A slot holding exactly ``delta`` (``None``: W0): one that already does, else the least recently used
        slot other than ``active``, rebuilt once no call reads it. Callers serialize (the activate lock).

        A wait that could never end becomes a new slot (one more set of LoRA-target weights, kept): when every
        other slot is read by the calling thread itself (``mine``: it activates from inside its own call, e.g. a
        ``generate``'s stream callback), or by a thread that waits for the activate lock this caller holds
        (``stuck``, counted by the runtime)."""
        self.clock += 1
        for i, held in enumerate(self.held):
            if held is delta:
                self.used[i] = self.clock
                return i
        victim = min((i for i in range(len(self.held)) if i != active),
                     key=lambda i: (self.readers[i] > 0, i in mine, self.used[i]))
        with self.cond:
            while self.readers[victim] and victim not in mine and not self.stuck[victim]:
                self.cond.wait()
            if self.readers[victim]:
                victim = self.weights.add_slot()
                self.readers.append(0)
                self.stuck.append(0)
                self.held.append(None)
                self.used.append(0)
        self.held[victim] = _UNKNOWN  # a failure half-way leaves it unusable until rebuilt
        self.weights.build(self.weights.slots[victim], delta.modules if delta is not None else {},
                           delta.encoded if delta is not None else None)
        self.held[victim] = delta
        self.used[victim] = self.clock
        return victim

    def hold(self, slot: int) -> None:
        """Count a call reading ``slot`` (the caller holds ``cond``)."""
        self.readers[slot] += 1

    def release(self, slot: int) -> None:
        with self.cond:
            self.readers[slot] -= 1
            if not self.readers[slot]:
                self.cond.notify_all()

    def forget(self, active: int | None) -> None:
        """Benchmarks only: treat every slot but ``active`` as holding nothing, so the next switch rebuilds (times
        what switching to a task no slot holds costs; the contents are left as they are)."""
        for i in range(len(self.held)):
            if i != active:
                self.held[i] = _UNKNOWN


def load_w0(folder: Path, files: Mapping[str, FileEntry], swap: SwapSpec) -> dict[str, np.ndarray]:
    """The pristine W0 of the swapped weights, hashed, float32 and finite, or refused: from the swap's own
    safetensors file (memory-mapped), or where the engine's data file already holds it (those bytes)."""
    tensors: dict[str, np.ndarray] = {}
    if swap.w0 is not None:
        tensors, _ = parse(map_file(folder, swap.w0, "swap W0 file", files[swap.w0]), str(folder / swap.w0))
    maps: dict[str, Any] = {}
    for name, w in swap.weights.items():
        src = w.source
        if src is None:
            continue
        if src.file not in maps:
            maps[src.file] = map_file(folder, src.file, "engine data file", None)  # its size is checked at open
        data = memoryview(maps[src.file])[src.offset:src.offset + src.length]
        if len(data) != src.length or hashlib.sha256(data).hexdigest() != src.sha256:
            raise DeploymentError(f"{folder / src.file}: the W0 of {name!r} at offset {src.offset} does not match "
                                  "the sha256 in the manifest; re-export the folder")
        stored = np.frombuffer(data, "<f4").reshape(w.shape[::-1] if src.transposed else w.shape)
        tensors[name] = np.ascontiguousarray(stored.T if src.transposed else stored)
    for name, t in tensors.items():
        if t.dtype != np.float32 or not np.isfinite(t).all():
            raise DeploymentError(f"{folder}: W0 tensor {name!r} is not finite float32; re-export the folder")
    return tensors
