"""``Runtime``: one base engine, many task deltas, atomic in-place swaps, mixed-task batches.

How a task is applied, chosen per deployment (``Runtime.mode``):

- ``swap`` (encoders on fp32, fp16, int8 bases): ``base/swap.onnx`` reads its LoRA-target weights from
  runtime-owned slots. ``activate`` rebuilds ``W0 + s·B·A`` into a slot no run is reading (waiting for
  runs that still read it), then flips; a run holds the slot it started on to its end, so every call sees
  one task's weights. A slot remembers the task it holds: switching back to it is a flip, no rebuild.
  Latency is the base engine's plus the cost of not prepacking those weights.
- ``unmerged`` (decoders by default, and int4 or other bases whose weights cannot be rebuilt on the
  device): the task's A and B are fed to ``base/lora.onnx``; activating switches to the task's feeds
  (built once, then cached), the base weights never change. At a decode step this costs what fed
  weights cost, and switching is ~free (measured on W2; ``benchmarks/README.md``).
- a task that is not a pure ``W0 + s·B·A`` update (DoRA, LoRA bias, heads inside the base) runs on
  its baked engine, opened on first use.

Every call works on one state, acquired once: the weights (slot, feeds or engine), the head and the label
names of one task. ``run(..., task=NAME)`` / ``classify(..., task=NAME)`` name the task per call, so a
multi-threaded app needs no shared "active" task at all; ``run(..., tasks=[...])`` serves one batch whose
rows belong to different tasks on ``base/lora.onnx``.

What the runtime reads is checked first: the manifest field by field, every listed file's size, the
hashes of the small files it reads (deltas, W0, tokenizer), W0's finiteness, every delta at ``open``;
``open(verify=True)`` also hashes the engines. Inputs are checked before they reach an engine.
Imports numpy and onnxruntime only (tokenization through ``tokenizers`` when text is passed).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeltaError, DeploymentError, EdgeloraError, InputError
from ..format.files import check_sizes, read_bytes, verify_files
from ..format.manifest import FORMAT_VERSION, TASK_NAME, Manifest, read_manifest
from ..lora import concat_feeds, stacked_feeds
from .decode import Sampler, Sampling, prompt_rows, shared_cache_loop
from .heads import apply_head, unsupported
from .inputs import FeedChecker
from .sessions import open_session, run_session
from .store import AdapterStore, DeltaRules, TaskDelta
from .swap import SlotPool, SwapWeights, load_w0

SUPPORTED_FORMAT = FORMAT_VERSION


@dataclass(frozen=True)
class _State:
    """One task as a call runs it. ``delta`` None: the base model."""

    task: str | None
    delta: TaskDelta | None = None
    slot: int | None = None  # swap mode: the slot holding its weights
    feeds: Mapping[str, np.ndarray] | None = None  # unmerged mode: the task's A, B, mask
    session: Any = None  # a task on its baked engine


@dataclass(frozen=True)
class Prediction:
    """A classification call's whole result, from one state: the task it ran under, that task's label names
    (None: class ids), the logits and their softmax, one row per input."""

    task: str | None
    labels: tuple[str, ...] | None
    logits: np.ndarray
    probabilities: np.ndarray

    def top(self) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class, per row."""
        best = self.probabilities.argmax(axis=1)
        names = self.labels or ()
        return [(names[i] if i < len(names) else str(i), float(p[i]))
                for i, p in zip(best, self.probabilities, strict=True)]


class Runtime:
    def __init__(self, folder: Path, manifest: Manifest, threads: int | None, max_resident: int | None,
                 provider: str | None, spinning: bool = True, unmerged: bool | None = None, slots: int = 2,
                 engine_format: str | None = None, mode: str | None = None) -> None:
        import onnxruntime as ort

        self._cond = threading.Condition()  # guards the state pointer and the slots' reader counts
        self._activating = threading.Lock()  # one rebuild at a time; held while a slot is chosen and built
        self._local = threading.local()  # .reading: the slots this thread's calls in flight hold (see _activate_lock)
        self._cache_lock = threading.Lock()  # the branch-feeds cache, the baked engines, the tokenizer
        self.folder = folder
        self.manifest = manifest
        self.threads = threads
        self.spinning = spinning
        self.provider = provider or manifest.target.provider
        available = ort.get_available_providers()
        if self.provider not in available:
            who = (f"provider {self.provider}" if provider
                   else f"target {manifest.target.name} needs {self.provider}, which")
            raise DeploymentError(f"{folder}: {who} is not in this onnxruntime {ort.__version__} (available: "
                                  f"{', '.join(available)}); pass one of those, or install an onnxruntime build "
                                  "with it")
        self.engine_format = _engine_format(folder, manifest, engine_format)
        self._provider_options: dict[str, str] = {}
        self._session_config: dict[str, str] = {}
        if self.engine_format == "ort":
            mobile = manifest.mobile
            assert mobile is not None  # _engine_format refuses "ort" without it
            self._provider_options = next((dict(p.options) for p in mobile.providers if p.name == self.provider), {})
            self._session_config["session.load_model_format"] = "ORT"
            if mobile.optimization_style == "runtime":  # replay what the converter saved for the CPU's nodes
                self._session_config["session.enable_saved_runtime_optimizations"] = "1"
        self.kind = manifest.base.io.kind
        self.io = manifest.base.io
        self.headless = manifest.base.headless
        self.max_positions = manifest.base.max_positions
        self._lora_graph = manifest.lora_graph
        self._lora_session: Any = None
        self._engines: dict[str, Any] = {}
        if mode is None and unmerged is None and manifest.runtime_mode is not None:
            mode = manifest.runtime_mode.mode  # chosen by the export from what it measured on this folder
        if unmerged is None:
            # Measured (benchmarks/README.md): a decode step pays the same ~1.14x for fed weights as for
            # LoRA branches, while a W2 rebuild takes 27 ms and switching branch feeds ~0; encoders pay
            # 1.05x swapped vs 1.2x as branches. So decoders default to branches, encoders to swaps.
            unmerged = self.kind == "causal-lm"
        if mode == "engines":
            unmerged = False
        elif mode is not None:
            unmerged = mode == "unmerged"
            if (manifest.swap if mode == "swap" else self._lora_graph) is None:
                why = manifest.swap_unavailable if mode == "swap" else "no base/lora.onnx (lora_graph = false)"
                raise InputError(f"mode = {mode!r}: {folder} cannot run it ({why}); open it with mode='engines'")
        swap = None if (unmerged and self._lora_graph) or mode == "engines" else manifest.swap
        self._lora_dims = {m: loc.dims() for m, loc in self._lora_graph.modules.items()} if self._lora_graph else {}
        self._swap: SwapWeights | None = None
        if swap is not None:
            workers = min(threads or os.cpu_count() or 1, 4)
            self._swap = SwapWeights(swap.weights, load_w0(folder, manifest.files, swap), swap.modules,
                                     threads=workers, slots=slots)
            self.mode = "swap"
            self._session = self._open(swap.engine)
            dims = self._swap.dims()
        elif self._lora_graph is not None and mode != "engines":
            self.mode = "unmerged"
            self._session = self._lora()
            dims = self._lora_dims
        else:
            self.mode = "engines"
            self._session = self._open(manifest.base.engine)
            dims = {m: loc.dims() for m, loc in manifest.name_map.items()}
        self._dims = dims
        self._outputs = [o.name for o in self._session.get_outputs()]
        past_dtypes = {i.name: np.dtype(np.float16 if "float16" in i.type else np.float32)
                       for i in self._session.get_inputs() if i.name.startswith("past_key_values.")}
        self._feeds = FeedChecker(self.io, manifest.base.vocab_size, self.max_positions, past_dtypes)
        self.store = AdapterStore(DeltaRules(manifest.base.fingerprint, dims, manifest.base.hidden_size),
                                  max_resident)
        for name, entry in manifest.tasks.items():  # every delta validated now, not at its first activate
            delta = self.store.add_file(name, folder, entry.delta, manifest.files[entry.delta], entry.engine,
                                        entry.swappable)
            if entry.labels is not None and delta.labels is not None and delta.labels != entry.labels:
                raise DeploymentError(f"{folder / entry.delta}: its labels {list(delta.labels or [])} differ from "
                                      f"the manifest's for task {name!r} {list(entry.labels)}; re-export the folder")
            if delta.pooling != entry.pooling:
                raise DeploymentError(f"{folder / entry.delta}: its head reads {delta.pooling} pooling, the manifest "
                                      f"says {entry.pooling} for task {name!r}; re-export the folder")
        self._slots = SlotPool(self._swap, self._cond) if self._swap is not None else None
        self._base_feeds = stacked_feeds([], self._dims) if self.mode == "unmerged" else None
        self._state = _State(None, slot=0 if self._swap else None, feeds=self._base_feeds)
        self._tokenizer: Any = None
        # each task's feeds for base/lora.onnx (unmerged mode, and mixed batches in any mode)
        self._feeds_cache: dict[str, tuple[TaskDelta, dict[str, np.ndarray]]] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], threads: int | None = None, max_resident: int | None = None,
             provider: str | None = None, spinning: bool = True, unmerged: bool | None = None, slots: int = 2,
             verify: bool = False, engine_format: str | None = None, mode: str | None = None) -> Runtime:
        """Open a deployment folder written by ``edgelora export``. ``threads``: ONNX Runtime intra-op threads
        (and swap workers, up to 4); ``max_resident``: LRU bound on tasks held in memory; ``provider``:
        override the target's execution provider; ``spinning=False``: engine threads never spin, not even
        between the steps of a run (by default they spin during a run and sleep once it returns);
        ``unmerged``: run tasks as LoRA branches on base/lora.onnx (``activate`` switches cached feeds) rather
        than rebuilding weights; default (None): branches for decoders, rebuilt weights for encoders,
        as measured; either way falls back to what the deployment has. ``slots`` (swap mode, ≥ 2): weight sets
        kept built; an app that names tasks per call (``run(task=...)``) can keep one per task to avoid
        rebuilds (each costs the LoRA targets' size: 7 MB on W1 fp32). ``verify``: also hash every engine
        against the manifest (size and the small files are always checked). ``engine_format``: ``"ort"`` runs
        ONNX Runtime Mobile's ORT-format models of a mobile-* folder (the default there; ``provider`` may then
        be a device provider the target lists, opened with its options), ``"onnx"`` the ONNX engines (the
        default elsewhere). ``mode``: ``"swap"``, ``"unmerged"`` or ``"engines"`` (each task on its baked engine,
        one session per resident task: the base engine's speed, a session's memory per task); overrides
        ``unmerged``; default: the folder's ``runtime_mode`` (decoders on a shared-cache graph: chosen by the
        export from the decode speed and switch time it measured), else as ``unmerged`` says.

        Raises :class:`DeploymentError` (one line, naming the file or field) for a folder that is incomplete,
        changed since export, malformed, or names paths outside itself."""
        folder = Path(path)
        if slots < 2:
            raise InputError(f"slots = {slots}; the swap needs at least 2 (one active, one to build into)")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
            # 0 and None both mean ONNX Runtime's own choice (its intra_op_num_threads = 0 convention)
            raise InputError(f"threads = {threads!r}; pass a number of threads ≥ 1, or 0 / None for ONNX Runtime's "
                             "default")
        manifest = read_manifest(folder)
        check_sizes(folder, manifest.files)
        if verify:
            verify_files(folder, manifest.files)
        if mode not in (None, "swap", "unmerged", "engines"):
            raise InputError(f"mode = {mode!r}; choose 'swap', 'unmerged' or 'engines'")
        return cls(folder, manifest, threads, max_resident, provider, spinning, unmerged, slots, engine_format, mode)

    def _open(self, rel: str) -> Any:
        if self.engine_format == "ort":
            ort_rel = self.manifest.mobile.engines.get(rel)  # type: ignore[union-attr]
            if ort_rel is None:
                raise DeploymentError(f"{self.folder}: {rel} has no ORT-format model in this folder (mobile.engines); "
                                      "open it with engine_format='onnx', or re-export with [mobile] lora_graph = true "
                                      "for the LoRA-branch graph")
            rel = ort_rel
        return open_session(self.folder, rel, self.provider, self.threads, self.spinning,
                            self.manifest.files.get(rel), self._provider_options, self._session_config)

    def _lora(self) -> Any:
        with self._cache_lock:
            if self._lora_session is None:
                if self._lora_graph is None:
                    raise EdgeloraError(f"{self.folder}: no base/lora.onnx (the target sets lora_graph = false); "
                                        "mixed-task batches need it: re-export with a target that writes it")
                self._lora_session = self._open(self._lora_graph.engine)
            return self._lora_session

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        return self.store.names

    @property
    def active(self) -> str | None:
        return self._state.task

    @property
    def tokenizer(self) -> Any:
        with self._cache_lock:
            if self._tokenizer is None:
                self._tokenizer = self._read_tokenizer()
            return self._tokenizer

    def _read_tokenizer(self) -> Any:
        from .text import Tokenizer

        rel = self.manifest.tokenizer
        if rel is None:
            raise InputError(f"{self.folder}: the deployment has no tokenizer; pass input_ids instead of text")
        files = self.manifest.files
        data = read_bytes(self.folder, f"{rel}/tokenizer.json", "tokenizer file", files[f"{rel}/tokenizer.json"])
        cfg = f"{rel}/tokenizer_config.json"
        config = read_bytes(self.folder, cfg, "tokenizer config", files[cfg]) if cfg in files else None
        return Tokenizer(data, config, self.max_positions or 512, str(self.folder / rel))

    def labels(self, task: str) -> list[str] | None:
        labels = self._delta(task).labels
        return list(labels) if labels is not None else None

    def num_labels(self, task: str) -> int | None:
        """Outputs of the task's classification head (None: no head, the base's outputs as they are)."""
        return self._delta(task).head_rows

    def load(self, name: str, path: str | os.PathLike[str], labels: Sequence[str] | None = None) -> None:
        """Add (or replace) a task from a delta file, validated now; a bad file raises and changes nothing.

        The task's head and label names come with the file (its own, or ``labels``); a file without label
        names may replace a task only with a head of the same shape (it keeps that task's names). Replacing
        the active task swaps its new weights, head and labels in together."""
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            raise InputError(f"task name {name!r} is not usable; use letters, digits, . _ - (up to 128)")
        with self._activate_lock():
            source, delta = self.store.read(name, Path(path), labels)
            if self.mode == "engines":
                raise DeltaError(f"{path}: this deployment runs tasks on their baked engines only (no swap or LoRA "
                                 "graph), and a loaded delta has none; export the task with the others")
            if self._needs_engine(delta):
                raise DeltaError(f"{path}: its head ({', '.join(unsupported(delta.head))}) changes the inside of the "
                                 "base, which only a baked engine can run, and a loaded delta has none; export it")
            old = self._replaced(name)
            if old is not None and delta.labels is None:
                if old.head_rows != delta.head_rows:
                    raise DeltaError(f"{path}: its head has {delta.head_rows or 'no'} outputs, task {name!r} has "
                                     f"{old.head_rows or 'none'} ({', '.join(old.labels or ())}); pass labels=[...] "
                                     "for the new head, or load it under another name")
                delta = replace(delta, labels=old.labels)
            if self._swap is not None and delta.swappable:
                self._swap.prepare(delta.modules, delta.encoded)  # int8: its first switch copies too
            self.store.put(name, source, delta, protect=self.active)
            with self._cache_lock:
                self._feeds_cache.pop(name, None)
            if self._state.task == name:
                self._commit(self._state_for(name, delta))

    def _replaced(self, name: str) -> TaskDelta | None:
        """The delta a load of ``name`` replaces (None: a new task, or one whose file went bad)."""
        if name not in self.store.names:
            return None
        try:
            return self.store.get(name, protect=self.active)
        except DeltaError:
            return None

    def unload(self, name: str) -> None:
        with self._activating:
            if name == self.active:
                raise EdgeloraError(f"task {name!r} is active; activate another task before unloading it")
            with self._cache_lock:
                self._feeds_cache.pop(name, None)
            try:
                self.store.unload(name)
            except KeyError:
                raise EdgeloraError(f"no task {name!r}; tasks: {', '.join(self.tasks)}") from None

    def _delta(self, name: str) -> TaskDelta:
        if not isinstance(name, str):
            raise InputError(f"task must be a task name (str), got {type(name).__name__}")
        try:
            delta = self.store.get(name, protect=self.active)
        except KeyError:
            raise EdgeloraError(f"no task {name!r}; tasks: {', '.join(self.tasks) or 'none'}") from None
        with self._cache_lock:
            for gone in set(self._feeds_cache) - set(self.store.resident):  # the LRU bound covers feeds too
                self._feeds_cache.pop(gone, None)
        return delta

    def _needs_engine(self, delta: TaskDelta) -> bool:
        return not delta.swappable or bool(unsupported(delta.head)) or self.mode == "engines"

    def activate(self, name: str | None) -> None:
        """Make ``name`` the task every following ``run`` without ``task=`` uses (``None``: the base model).
        Atomic: a failure (bad delta file, wrong base, wrong shapes) raises and leaves the previous task
        active. Calls in flight finish on the weights they started with; a swap waits only for calls still
        reading the slot it rebuilds (a ``generate`` that began two swaps ago holds its slot until it ends)."""
        with self._activate_lock():
            delta = self._delta(name) if name is not None else None
            if name == self._state.task and delta is self._state.delta:
                return
            self._commit(self._state_for(name, delta))

    def _reading(self) -> list[int]:
        """The slots the calling thread's own calls in flight hold (a stream callback runs inside one)."""
        reading = getattr(self._local, "reading", None)
        if reading is None:
            reading = self._local.reading = []
        return reading

    @contextmanager
    def _activate_lock(self) -> Iterator[None]:
        """The activate lock, taken so that no wait can close a cycle: a thread that itself holds slots (it
        activates, loads or runs another task from inside a ``generate``'s stream callback) counts those slots as
        stuck while it waits, so a rebuild that would wait for them builds into a new slot instead
        (``SlotPool.slot_for``); the call in flight keeps the weights it started with."""
        mine = list(self._reading())
        if not mine or self._slots is None:
            with self._activating:
                yield
            return
        with self._cond:
            for slot in mine:
                self._slots.stuck[slot] += 1
            self._cond.notify_all()
        try:
            self._activating.acquire()
        finally:
            with self._cond:
                for slot in mine:
                    self._slots.stuck[slot] -= 1
        try:
            yield
        finally:
            self._activating.release()

    def _state_for(self, name: str | None, delta: TaskDelta | None) -> _State:
        """The state that runs ``delta`` (``None``: the base): its slot built if needed, its feeds or engine.
        The caller holds ``_activating``."""
        if delta is not None and self._needs_engine(delta):
            return _State(name, delta, session=self._engine(delta))
        if self._slots is not None:
            return _State(name, delta, slot=self._slots.slot_for(delta, self._state.slot, self._reading()))
        if self.mode == "unmerged":
            return _State(name, delta, feeds=self._branch_feeds(delta) if delta is not None else self._base_feeds)
        return _State(name, delta)

    def _commit(self, state: _State) -> None:
        with self._cond:
            self._state = state

    def _engine(self, delta: TaskDelta) -> Any:
        if delta.engine is None:
            raise EdgeloraError(f"task {delta.name!r} cannot be swapped (not a pure W0 + s·B·A update) and has no "
                                "baked engine; export with bake_task_engines = true")
        with self._cache_lock:
            if delta.engine not in self._engines:
                self._engines[delta.engine] = self._open(delta.engine)
            return self._engines[delta.engine]

    # ------------------------------------------------------------------ running
    def _acquire(self, task: str | None) -> _State:
        """The state a call runs on, held (its slot cannot be rebuilt) until :meth:`_release`: the active one,
        or ``task``'s (the active state when it is that task, else built without changing the active task)."""
        with self._cond:
            state = self._state
            if task is None or state.task == task:
                if state.slot is not None:
                    self._slots.hold(state.slot)  # type: ignore[union-attr]
                    self._reading().append(state.slot)
                return state
        with self._activate_lock():
            state = self._state_for(task, self._delta(task))
            if state.slot is not None:
                with self._cond:
                    self._slots.hold(state.slot)  # type: ignore[union-attr]
                self._reading().append(state.slot)
            return state

    def _release(self, state: _State) -> None:
        if state.slot is not None:
            self._reading().remove(state.slot)
            self._slots.release(state.slot)  # type: ignore[union-attr]

    def _inputs(self, text: str | Sequence[str] | None, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Feeds for the engine (text tokenized and cut to the base's positions), every input checked first."""
        if text is not None:
            clash = sorted({"input_ids", "attention_mask", "token_type_ids"} & set(inputs))
            if clash:
                raise InputError(f"pass text or {', '.join(clash)}, not both")
            inputs = {**self.tokenizer.encode(text), **inputs}
        return self._feeds.check(inputs)

    def _session_run(self, sess: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        return run_session(sess, feeds, names, self.folder)

    def _run_state(self, state: _State, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if state.session is not None:  # a task on its baked engine
            return self._session_run(state.session, feeds, [o.name for o in state.session.get_outputs()])
        extra: Mapping[str, np.ndarray] = {}
        if state.feeds is not None:
            extra = state.feeds
        elif state.slot is not None:
            extra = self._swap.slots[state.slot].arrays  # type: ignore[union-attr]
        out = self._session_run(self._session, {**feeds, **extra}, self._outputs)
        if self.headless and state.delta is not None and state.delta.head:
            return apply_head(state.delta.head, out, feeds["attention_mask"], state.delta.pooling)
        return out

    def _branch_feeds(self, delta: TaskDelta) -> dict[str, np.ndarray]:
        """The task's feeds for base/lora.onnx, built once per resident task (and per loaded delta: a
        mixed batch racing a `load` of the same name never caches the old delta's feeds as the new one's)."""
        with self._cache_lock:
            cached = self._feeds_cache.get(delta.name)
            if cached is None or cached[0] is not delta:
                cached = self._feeds_cache[delta.name] = (delta, stacked_feeds([delta.modules],
                                                                                self._lora_dims or self._dims))
            return cached[1]

    def run(self, text: str | Sequence[str] | None = None, tasks: Sequence[str] | None = None,
            task: str | None = None, **inputs: Any) -> dict[str, np.ndarray]:
        """Outputs for ``input_ids``/``attention_mask`` (or ``text``) under ``task`` (default: the active task);
        with ``tasks`` (one name per row), a mixed-task batch on the LoRA-branch graph. Naming ``task`` runs
        that task without changing the active one."""
        feeds = self._inputs(text, inputs)
        if tasks is not None:
            if task is not None:
                raise InputError("pass task= (one task) or tasks= (one per row), not both")
            return self._run_mixed(list(tasks), feeds)
        state = self._acquire(task)
        try:
            return self._run_state(state, feeds)
        finally:
            self._release(state)

    def _run_mixed(self, tasks: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = feeds["input_ids"].shape[0]
        if len(tasks) != rows:
            raise InputError(f"tasks has {len(tasks)} names for {rows} rows; give one task per row")
        names = list(dict.fromkeys(tasks))
        if self.mode == "engines":
            raise EdgeloraError(f"{self.folder}: no base/lora.onnx; mixed-task batches need a target with lora_graph")
        deltas = []
        for name in names:
            delta = self._delta(name)
            if self._needs_engine(delta):
                raise EdgeloraError(f"task {name!r} runs on its baked engine only; it cannot share a mixed batch")
            deltas.append(delta)
        sess = self._lora()
        extra = concat_feeds([self._branch_feeds(d) for d in deltas], [names.index(t) for t in tasks])
        out = self._session_run(sess, {**feeds, **extra}, [o.name for o in sess.get_outputs()])
        if not (self.headless and any(d.head for d in deltas)):
            return out
        per_row = [apply_head(deltas[names.index(t)].head, {k: v[i:i + 1] for k, v in out.items()},
                              feeds["attention_mask"][i:i + 1], deltas[names.index(t)].pooling)
                   for i, t in enumerate(tasks)]
        width = max(r["logits"].shape[1] for r in per_row)
        logits = np.full((rows, width), -np.inf, np.float32)  # tasks with fewer labels: -inf, argmax-safe
        for i, r in enumerate(per_row):
            logits[i, : r["logits"].shape[1]] = r["logits"][0]
        return {"logits": logits}

    def predict(self, text: str | Sequence[str] | None = None, task: str | None = None, **inputs: Any) -> Prediction:
        """Classification with everything from one state: the task it ran under (``task`` or the active one),
        its logits, probabilities and that task's label names."""
        feeds = self._inputs(text, inputs)
        state = self._acquire(task)
        try:
            out = self._run_state(state, feeds)
        finally:
            self._release(state)
        logits = out.get("logits")
        if logits is None or logits.ndim != 2:
            raise InputError(f"{'task ' + repr(state.task) if state.task else 'the base model'} has no "
                             "classification head; use run() for its outputs")
        z = logits.astype(np.float64)
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return Prediction(state.task, state.delta.labels if state.delta else None, logits, probs)

    def classify(self, text: str | Sequence[str], task: str | None = None) -> list[tuple[str, float]]:
        """(label, probability) per text for ``task`` (default: the active task); label names and
        probabilities come from the same task even while another thread switches tasks."""
        if isinstance(text, (list, tuple)) and not text:
            return []
        return self.predict(text=text, task=task).top()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, stream: Callable[[int], Any] | None = None,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None, task: str | None = None,
                 top_k: int = 0, repetition_penalty: float = 1.0) -> list[int] | list[list[int]]:
        """New token ids after ``prompt_ids``, incrementally through the KV cache: one list for one prompt (a list
        of ids, a ``(sequence,)`` array), one list per prompt for several (a list of id lists, a ``(batch,
        sequence)`` array), each exactly what that prompt generates alone. The whole call uses ``task`` (default:
        the task active when it starts), even if ``stream`` activates another. Greedy at ``temperature = 0``, else
        sampled (``seed``, the same for each prompt) after ``repetition_penalty``, ``top_k`` (0: off) and
        ``top_p``; it stops after ``max_new_tokens`` or at a token of ``eos_token_id`` (one id or several; it is
        returned). ``stream`` is called with each token as it is chosen (prompt after prompt). A prompt that does
        not leave ``max_new_tokens`` of the base's positions is refused, never cut. See ``decode.py``."""
        if self.kind != "causal-lm":
            raise InputError(f"generate needs a causal-lm deployment; this one is {self.kind}")
        stop = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
        sampling = Sampling.checked(temperature, top_p, top_k, repetition_penalty, stop)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens = {max_new_tokens!r}; pass an integer ≥ 0")
        rows, several = prompt_rows(prompt_ids)
        feeds = []
        for i, ids in enumerate(rows):
            if self.max_positions is not None and ids.shape[1] + max_new_tokens > self.max_positions:
                which = f"prompt {i} has" if several else "the prompt has"
                raise InputError(f"{which} {ids.shape[1]} tokens and max_new_tokens = {max_new_tokens}: together they "
                                 f"exceed the base's {self.max_positions} positions; shorten the prompt or lower "
                                 "max_new_tokens")
            feeds.append(self._inputs(None, {"input_ids": ids}))
        state = self._acquire(task)
        try:
            out = [self._generate_one(state, f, int(max_new_tokens),
                                      Sampler(sampling, self.manifest.base.vocab_size, f["input_ids"][0], seed), stream)
                   for f in feeds]
        finally:
            self._release(state)
        return out if several else out[0]

    def _generate_one(self, state: _State, feeds: dict[str, np.ndarray], max_new: int, sampler: Sampler,
                      stream: Callable[[int], Any] | None) -> list[int]:
        """One prompt's new tokens on ``state`` (held by the caller)."""
        if self.io.kv_cache == "shared":
            sess, extra = self._session_and_extra(state)
            return shared_cache_loop(sess, self.io, extra, feeds["input_ids"], max_new, sampler, stream, self.folder)
        new: list[int] = []
        total = feeds["input_ids"].shape[1]
        for _ in range(max_new):
            out = self._run_state(state, feeds)
            token = sampler(out["logits"][0, -1])
            new.append(token)
            if stream is not None:
                stream(token)
            if token in sampler.s.stop:
                break
            total += 1
            feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
            for i in range(self.io.num_layers):
                for kv in ("key", "value"):
                    feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
        return new

    def generate_text(self, prompt: str, max_new_tokens: int = 64, stream: Callable[[str], Any] | None = None,
                      on_token: Callable[[int], Any] | None = None, **options: Any) -> str:
        """Text in, text out through the deployment's tokenizer: ``generate`` on the prompt's ids (no special
        tokens added but the tokenizer's own), stopping at the tokenizer's end-of-sequence token unless
        ``eos_token_id`` is given. ``stream`` receives the text as it grows, piece by piece; ``on_token`` each id.
        A prompt longer than the tokenizer's limit (the base's positions) is refused, not cut."""
        tok = self.tokenizer
        if not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}; pass a string (or call generate with token ids)")
        ids = tok.prompt(prompt)  # refused, not cut, if longer than the tokenizer's limit
        options.setdefault("eos_token_id", tok.eos_id)
        pieces: list[int] = []
        shown = ""

        def each(token: int) -> None:
            nonlocal shown
            pieces.append(token)
            if on_token is not None:
                on_token(token)
            text = tok.decode(pieces)
            if stream is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
                stream(text[len(shown):])
                shown = text

        out = self.generate(ids, max_new_tokens, stream=each, **options)
        text = tok.decode(out)  # type: ignore[arg-type]  # one prompt: one list of ids
        if stream is not None and len(text) > len(shown):
            stream(text[len(shown):])
        return text

    def _session_and_extra(self, state: _State) -> tuple[Any, Mapping[str, np.ndarray]]:
        """The session a state runs on and the feeds its mode adds (swap slot weights, LoRA branch A, B)."""
        if state.session is not None:
            return state.session, {}
        if state.feeds is not None:
            return self._session, state.feeds
        if state.slot is not None:
            return self._session, self._swap.slots[state.slot].arrays  # type: ignore[union-attr]
        return self._session, {}

    # ------------------------------------------------------------------ checking itself
    def self_test(self, baked: bool = True) -> Any:
        """Re-run the folder's reference vectors on this machine (``conformance.py``): each task in this
        runtime's mode and on its baked engine (``baked``) vs PyTorch's outputs under the target's tolerances,
        whether each task changes the outputs, A→B→A bit-exactness. Returns a ``SelfTest`` (``.ok``,
        ``.summary()``, ``.checks``); a folder without reference vectors gives one whose ``unavailable`` says so.
        It switches the active task while it runs (call it before serving) and restores it at the end."""
        from .conformance import Runner, SelfTest, load_references, run_self_test

        started = time.perf_counter()
        refs = load_references(self.folder, self.manifest)
        if isinstance(refs, str):
            return SelfTest((), time.perf_counter() - started, refs, self.mode)

        def run(task: str | None, ref: Any) -> dict[str, np.ndarray]:
            return self.run(**ref.inputs)  # the active task: the runner activated it

        def base_with_head(task: str, ref: Any) -> dict[str, np.ndarray]:
            delta = self._delta(task)
            self.activate(None)
            out = self.run(**ref.inputs)
            if self.headless and delta.head and not unsupported(delta.head):
                return apply_head(delta.head, out, ref.inputs["attention_mask"], delta.pooling)
            return out

        def on_engine(task: str, ref: Any) -> dict[str, np.ndarray] | None:
            delta = self._delta(task)
            if delta.engine is None or self._needs_engine(delta):  # none, or already what the mode runs
                return None
            return self._run_state(_State(task, delta, session=self._engine(delta)), self._feeds.check(ref.inputs))

        spec = self.manifest.conformance
        assert spec is not None  # load_references returned vectors
        start = self.active
        try:
            return run_self_test(Runner(run, base_with_head, on_engine if baked else lambda t, r: None,
                                        self.activate, self._forget_built),
                                 refs, spec.tolerance, self.mode, started)
        finally:
            self.activate(start)

    # ------------------------------------------------------------------ measuring
    def _forget_built(self, encodings: bool = False) -> None:
        """Benchmarks only: treat every slot but the active one as holding nothing, so the next switch rebuilds
        (times what switching to a task no slot holds costs; the slots' contents are left as they are).
        ``encodings``: also drop the int8 encodings the tasks keep, so the rebuild re-quantizes."""
        if self._slots is not None:
            with self._activating:
                self._slots.forget(self._state.slot)
                if encodings:
                    for name in self.store.resident:
                        self.store.get(name, protect=self.active).encoded.clear()

    def benchmark(self, runs: int = 30, swaps: int = 30, sequence: int | None = None) -> dict[str, Any]:
        """Median ``run`` latency (active task) and median ``activate`` time cycling through the tasks and the
        base, each switch a rebuild (as to a task no slot holds)."""
        seq = sequence or self.manifest.target.sequence
        ids = np.random.default_rng(0).integers(5, self.manifest.base.vocab_size, (1, seq))
        for _ in range(3):
            self.run(input_ids=ids)
        run_ms = []
        for _ in range(runs):
            t = time.perf_counter()
            self.run(input_ids=ids)
            run_ms.append((time.perf_counter() - t) * 1e3)
        act_ms = []
        order: list[str | None] = [*self.tasks, None]
        start = self.active
        for i in range(swaps):
            self._forget_built()
            t = time.perf_counter()
            self.activate(order[i % len(order)])
            act_ms.append((time.perf_counter() - t) * 1e3)
        self.activate(start)
        return {"mode": self.mode, "run_median_ms": float(np.median(run_ms)),
                "activate_median_ms": float(np.median(act_ms)), "runs": runs, "swaps": swaps,
                "threads": self.threads}


def _engine_format(folder: Path, manifest: Manifest, asked: str | None) -> str:
    """``"ort"`` (a mobile folder's ORT-format models) or ``"onnx"``; default: the folder's own kind."""
    if asked is None:
        return "ort" if manifest.mobile is not None else "onnx"
    if asked not in ("onnx", "ort"):
        raise InputError(f"engine_format = {asked!r}; choose 'onnx' or 'ort'")
    if asked == "ort" and manifest.mobile is None:
        raise DeploymentError(f"{folder}: no ORT-format models (target {manifest.target.name} has no [mobile]); "
                              "export with a mobile-* target, or open it with engine_format='onnx'")
    return asked
