"""``Runtime``: one base engine, many task deltas, atomic in-place swaps, mixed-task batches.

How a task is applied, chosen per deployment (``Runtime.mode``):

- ``swap`` (encoders on fp32, fp16, int8 bases): ``base/swap.onnx`` reads its LoRA-target weights from two
  runtime-owned slots. ``activate`` rebuilds ``W0 + s·B·A`` into the idle slot (waiting for runs that
  still read it), then flips; a run holds the slot it started on to its end, so every call sees one
  task's weights. Latency is the base engine's plus the cost of not prepacking those weights.
- ``unmerged`` (decoders by default, and int4 or other bases whose weights cannot be rebuilt on the
  device): the task's A and B are fed to ``base/lora.onnx``; activating switches to the task's feeds
  (built once, then cached), the base weights never change. At a decode step this costs what fed
  weights cost, and switching is ~free (measured on W2; ``benchmarks/README.md``).
- a task that is not a pure ``W0 + s·B·A`` update (DoRA, LoRA bias, heads inside the base) runs on
  its baked engine, opened on first use.

``run(..., tasks=[...])`` serves one batch whose rows belong to different tasks on ``base/lora.onnx``.
Imports numpy and onnxruntime only (tokenization through ``tokenizers`` when text is passed).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..deploy import FORMAT_VERSION, MANIFEST
from ..errors import EdgeloraError
from .files import mmap_safetensors, read_json
from .heads import apply_head, unsupported
from .lora import concat_feeds, stacked_feeds
from .store import AdapterStore, TaskDelta
from .swap import Location, SwapWeights

SUPPORTED_FORMAT = FORMAT_VERSION


def session_options(threads: int | None, spinning: bool = True) -> Any:
    """ONNX Runtime's defaults and the thread count. Worker threads spin between the steps of a run
    (``spinning``; off: they sleep at once, kinder to an app sharing the cores, ~3-4% slower runs on W1)
    but stop spinning when the run returns (``session.force_spinning_stop``). ONNX Runtime's default keeps
    them spinning after it: measured on W1, a core's worth of CPU (48 ms in 50 ms idle) taken from
    whatever the app does next — an ``activate`` right after a run then took 3.3-3.7 ms instead of 2.3-2.9."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass(frozen=True)
class _State:
    task: str | None
    slot: int | None = None  # swap mode
    feeds: Mapping[str, np.ndarray] | None = None  # unmerged mode: the task's A, B, mask
    session: Any = None  # a task on its baked engine
    head: Mapping[str, np.ndarray] | None = None


class Runtime:
    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None, max_resident: int | None,
                 provider: str | None, spinning: bool = True, unmerged: bool | None = None) -> None:
        import onnxruntime as ort

        self.folder = folder
        self.manifest = manifest
        self.threads = threads
        self.spinning = spinning
        self.provider = provider or manifest["target"]["provider"]
        if self.provider not in ort.get_available_providers():
            raise EdgeloraError(f"{folder}: target {manifest['target']['name']} needs {self.provider}, which this "
                                f"onnxruntime lacks (has {', '.join(ort.get_available_providers())})")
        self.kind = manifest["base"]["io"]["kind"]
        self.io = manifest["base"]["io"]
        self.headless = bool(manifest["base"].get("headless"))
        self._lora_graph = manifest.get("lora_graph")
        self._lora_session: Any = None
        self._engines: dict[str, Any] = {}
        if unmerged is None:
            # Measured (benchmarks/README.md): a decode step pays the same ~1.14x for fed weights as for
            # LoRA branches, while a W2 rebuild takes 27 ms and switching branch feeds ~0; encoders pay
            # 1.05x swapped vs 1.2x as branches. So decoders default to branches, encoders to swaps.
            unmerged = manifest["base"]["io"]["kind"] == "causal-lm"
        swap = None if unmerged and self._lora_graph else manifest.get("swap")
        self._lora_dims = _module_dims(self._lora_graph["modules"]) if self._lora_graph else {}
        if swap:
            locations = {m: Location.from_json(d) for m, d in swap["modules"].items()}
            w0, _ = mmap_safetensors(folder / swap["w0"])
            workers = min(threads or os.cpu_count() or 1, 4)
            self._swap: SwapWeights | None = SwapWeights(swap, w0, locations, threads=workers)
            self.mode = "swap"
            self._session = self._open(folder / swap["engine"])
            dims = self._swap.dims()
        else:
            self._swap = None
            if self._lora_graph:
                self.mode = "unmerged"
                self._session = self._lora()
                dims = self._lora_dims
            else:
                self.mode = "engines"
                self._session = self._open(folder / manifest["base"]["engine"])
                dims = _module_dims(manifest["name_map"]["modules"])
        self._dims = dims
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._input_types = {i.name: i.type for i in self._session.get_inputs()}
        self.store = AdapterStore(manifest["base"]["fingerprint"], dims, max_resident)
        for name, entry in manifest["tasks"].items():
            self.store.register(name, folder / entry["delta"])
        self._readers = [0, 0]
        self._cond = threading.Condition()
        self._activating = threading.Lock()
        self._state = _State(None, slot=0 if self._swap else None,
                             feeds=self._base_feeds() if self.mode == "unmerged" else None)
        self._tokenizer: Any = None
        # each task's feeds for base/lora.onnx (unmerged mode, and mixed batches in any mode)
        self._feeds_cache: dict[str, tuple[Mapping[str, Any], dict[str, np.ndarray]]] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], threads: int | None = None, max_resident: int | None = None,
             provider: str | None = None, spinning: bool = True, unmerged: bool | None = None) -> Runtime:
        """Open a deployment folder written by ``edgelora export``. ``threads``: ONNX Runtime intra-op threads
        (and swap workers, up to 4); ``max_resident``: LRU bound on tasks held in memory; ``provider``:
        override the target's execution provider; ``spinning=False``: engine threads never spin, not even
        between the steps of a run (by default they spin during a run and sleep once it returns);
        ``unmerged``: run tasks as LoRA branches on base/lora.onnx (``activate`` switches cached feeds) rather
        than rebuilding weights; default (None): branches for decoders, rebuilt weights for encoders,
        as measured; either way falls back to what the deployment has."""
        folder = Path(path)
        manifest = read_json(folder / MANIFEST, "manifest.json")
        if manifest.get("format") != SUPPORTED_FORMAT:
            raise EdgeloraError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this runtime reads "
                                f"{SUPPORTED_FORMAT}; re-export with this edgelora version")
        try:
            return cls(folder, manifest, threads, max_resident, provider, spinning, unmerged)
        except KeyError as exc:
            raise EdgeloraError(f"{folder / MANIFEST}: field {exc} is missing; re-run edgelora export") from None

    def _open(self, path: Path) -> Any:
        import onnxruntime as ort

        providers = [self.provider] if self.provider == "CPUExecutionProvider" else [self.provider,
                                                                                      "CPUExecutionProvider"]
        return ort.InferenceSession(str(path), session_options(self.threads, self.spinning), providers=providers)

    def _lora(self) -> Any:
        if self._lora_session is None:
            if not self._lora_graph:
                raise EdgeloraError(f"{self.folder}: no base/lora.onnx (the target sets lora_graph = false); "
                                    "mixed-task batches need it: re-export with a target that writes it")
            self._lora_session = self._open(self.folder / self._lora_graph["engine"])
        return self._lora_session

    def _base_feeds(self) -> dict[str, np.ndarray]:
        return stacked_feeds([], self._dims)

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        return self.store.names

    @property
    def active(self) -> str | None:
        return self._state.task

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from .text import Tokenizer

            self._tokenizer = Tokenizer(self.folder / (self.manifest.get("tokenizer") or "tokenizer"))
        return self._tokenizer

    def labels(self, task: str) -> list[str] | None:
        entry = self.manifest["tasks"].get(task) or {}
        return entry.get("labels")

    def load(self, name: str, path: str | os.PathLike[str]) -> None:
        """Add (or replace) a task from a delta file, validated now; a bad file raises and changes nothing.
        Replacing the active task swaps its new weights in."""
        if not name or "/" in name:
            raise EdgeloraError(f"task name {name!r} is not usable; use letters, digits, - or _")
        with self._activating:
            delta = self.store.load(name, Path(path), protect=self.active)
            self._feeds_cache.pop(name, None)
            if self._state.task == name:
                self._switch(name, delta)

    def unload(self, name: str) -> None:
        with self._activating:
            if name == self.active:
                raise EdgeloraError(f"task {name!r} is active; activate another task before unloading it")
            self._feeds_cache.pop(name, None)
            try:
                self.store.unload(name)
            except KeyError:
                raise EdgeloraError(f"no task {name!r}; tasks: {', '.join(self.tasks)}") from None

    def _delta(self, name: str) -> TaskDelta:
        try:
            delta = self.store.get(name, protect=self.active)
            for gone in set(self._feeds_cache) - set(self.store.resident):  # the LRU bound covers feeds too
                self._feeds_cache.pop(gone, None)
            return delta
        except KeyError:
            raise EdgeloraError(f"no task {name!r}; tasks: {', '.join(self.tasks) or 'none'}") from None

    def _needs_engine(self, name: str, delta: TaskDelta) -> bool:
        entry = self.manifest["tasks"].get(name, {})
        return entry.get("swappable") is False or bool(unsupported(delta.head)) or self.mode == "engines"

    def activate(self, name: str | None) -> None:
        """Make ``name`` the task every following ``run`` uses (``None``: the base model). Atomic: a failure
        (bad delta file, wrong base, wrong shapes) raises and leaves the previous task active. Calls in
        flight finish on the weights they started with; a swap waits only for calls still reading the
        idle slot (a ``generate`` that began two swaps ago holds its slot until it ends)."""
        with self._activating:
            if name == self._state.task:
                return
            self._switch(name, self._delta(name) if name is not None else None)

    def _switch(self, name: str | None, delta: TaskDelta | None) -> None:
        if delta is None:
            self._commit(self._build({}, None, None))
        elif self._needs_engine(delta.name, delta):
            self._commit(_State(delta.name, session=self._engine(delta.name), head=None))
        else:
            self._commit(self._build(delta.modules, delta.name, delta.head))

    def _build(self, modules: Mapping[str, Any], name: str | None, head: Mapping[str, np.ndarray] | None) -> _State:
        if self._swap is None:
            feeds = self._branch_feeds(name, modules) if name is not None and modules else self._base_feeds()
            return _State(name, feeds=feeds, head=head)
        current = self._state.slot if self._state.slot is not None else 0
        target = 1 - current
        with self._cond:
            while self._readers[target]:
                self._cond.wait()
        self._swap.build(self._swap.slots[target], modules)
        return _State(name, slot=target, head=head)

    def _commit(self, state: _State) -> None:
        with self._cond:
            self._state = state

    def _engine(self, name: str) -> Any:
        if name not in self._engines:
            entry = self.manifest["tasks"][name]
            if not entry.get("engine"):
                raise EdgeloraError(f"task {name!r} cannot be swapped ({entry.get('not_swappable_reason')}) and the "
                                    "target wrote no baked engine for it; export with bake_task_engines = true")
            self._engines[name] = self._open(self.folder / entry["engine"])
        return self._engines[name]

    # ------------------------------------------------------------------ running
    def _acquire(self) -> _State:
        with self._cond:
            state = self._state
            if state.slot is not None:
                self._readers[state.slot] += 1
            return state

    def _release(self, state: _State) -> None:
        if state.slot is not None:
            with self._cond:
                self._readers[state.slot] -= 1
                if not self._readers[state.slot]:
                    self._cond.notify_all()

    def _inputs(self, text: str | Sequence[str] | None, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        if text is not None:
            inputs = {**self.tokenizer.encode(text), **inputs}
        if "input_ids" not in inputs:
            raise EdgeloraError("run needs input_ids (or text=...)")
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        feeds = {"input_ids": ids}
        mask = inputs.get("attention_mask")
        feeds["attention_mask"] = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64).reshape(
            ids.shape[0], -1)
        if self.kind == "causal-lm":
            past_len = feeds["attention_mask"].shape[1] - ids.shape[1]
            for name in self.io["inputs"]:
                if name.startswith("past_key_values."):
                    value = inputs.get(name)
                    if value is None:
                        if past_len:
                            raise EdgeloraError(f"attention_mask covers {past_len} past tokens but {name} is missing")
                        dtype = np.float16 if "float16" in self._input_types.get(name, "") else np.float32
                        value = np.zeros((ids.shape[0], self.io["num_kv_heads"], 0, self.io["head_dim"]), dtype)
                    feeds[name] = value
        unknown = set(inputs) - set(feeds) - set(self.io["inputs"])
        if unknown:
            raise EdgeloraError(f"unknown input(s) {', '.join(sorted(unknown))}; the engine takes "
                                f"{', '.join(self.io['inputs'])}")
        return feeds

    def _run_state(self, state: _State, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if state.session is not None:
            sess = state.session
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(None, dict(feeds)), strict=True))
        extra: Mapping[str, np.ndarray] = state.feeds if state.feeds is not None else \
            self._swap.slots[state.slot].arrays  # type: ignore[union-attr]
        out = dict(zip(self._outputs, self._session.run(None, {**feeds, **extra}), strict=True))
        if self.headless and state.head:
            return apply_head(state.head, out, feeds["attention_mask"])
        return out

    def _branch_feeds(self, name: str, modules: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The task's feeds for base/lora.onnx, built once per resident task (and per loaded delta: a
        mixed batch racing a `load` of the same name never caches the old delta's feeds as the new one's)."""
        cached = self._feeds_cache.get(name)
        if cached is None or cached[0] is not modules:
            cached = self._feeds_cache[name] = (modules, stacked_feeds([modules], self._lora_dims or self._dims))
        return cached[1]

    def run(self, text: str | Sequence[str] | None = None, tasks: Sequence[str] | None = None,
            **inputs: Any) -> dict[str, np.ndarray]:
        """Outputs of the active task for ``input_ids``/``attention_mask`` (or ``text``); with ``tasks`` (one
        name per row), a mixed-task batch on the LoRA-branch graph."""
        feeds = self._inputs(text, inputs)
        if tasks is not None:
            return self._run_mixed(list(tasks), feeds)
        state = self._acquire()
        try:
            return self._run_state(state, feeds)
        finally:
            self._release(state)

    def _run_mixed(self, tasks: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = feeds["input_ids"].shape[0]
        if len(tasks) != rows:
            raise EdgeloraError(f"tasks has {len(tasks)} names for {rows} rows; give one task per row")
        names = list(dict.fromkeys(tasks))
        deltas = []
        for name in names:
            delta = self._delta(name)
            if self._needs_engine(name, delta) and self.mode != "engines":
                raise EdgeloraError(f"task {name!r} runs on its baked engine only; it cannot share a mixed batch")
            deltas.append(delta)
        if self.mode == "engines":
            raise EdgeloraError(f"{self.folder}: no base/lora.onnx; mixed-task batches need a target with lora_graph")
        sess = self._lora()
        extra = concat_feeds([self._branch_feeds(d.name, d.modules) for d in deltas], [names.index(t) for t in tasks])
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, **extra}), strict=True))
        if not (self.headless and any(d.head for d in deltas)):
            return out
        per_row = [apply_head(deltas[names.index(t)].head, {k: v[i:i + 1] for k, v in out.items()},
                              feeds["attention_mask"][i:i + 1]) for i, t in enumerate(tasks)]
        width = max(r["logits"].shape[1] for r in per_row)
        logits = np.full((rows, width), -np.inf, np.float32)  # tasks with fewer labels: -inf, argmax-safe
        for i, r in enumerate(per_row):
            logits[i, : r["logits"].shape[1]] = r["logits"][0]
        return {"logits": logits}

    def classify(self, text: str | Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability) per text for the active classification task."""
        logits = self.run(text=text)["logits"]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        labels = self.labels(self.active) if self.active else None
        best = probs.argmax(axis=1)
        return [((labels[i] if labels else str(i)), float(p[i])) for i, p in zip(best, probs, strict=True)]

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stream: Callable[[int], Any] | None = None, seed: int | None = None,
                 eos_token_id: int | None = None) -> list[int]:
        """New token ids after ``prompt_ids`` (one sequence), incrementally through the KV cache. The whole
        generation uses the task that was active when it started."""
        if self.kind != "causal-lm":
            raise EdgeloraError(f"generate needs a causal-lm deployment; this one is {self.kind}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise EdgeloraError("temperature must be >= 0 and top_p in (0, 1]")
        ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise EdgeloraError("generate needs at least one prompt token")
        rng = np.random.default_rng(seed)
        state = self._acquire()
        try:
            feeds = self._inputs(None, {"input_ids": ids})
            new: list[int] = []
            total = ids.shape[1]
            for _ in range(max_new_tokens):
                out = self._run_state(state, feeds)
                token = _sample(out["logits"][0, -1], temperature, top_p, rng)
                new.append(token)
                if stream is not None:
                    stream(token)
                if eos_token_id is not None and token == eos_token_id:
                    break
                total += 1
                feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
                for i in range(self.io["num_layers"]):
                    for kv in ("key", "value"):
                        feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
            return new
        finally:
            self._release(state)

    # ------------------------------------------------------------------ measuring
    def benchmark(self, runs: int = 30, swaps: int = 30, sequence: int | None = None) -> dict[str, Any]:
        """Median ``run`` latency (active task) and median ``activate`` time cycling through the tasks."""
        seq = sequence or int(self.manifest["target"]["shapes"]["sequence"])
        ids = np.random.default_rng(0).integers(5, int(self.manifest["base"]["vocab_size"]), (1, seq))
        for _ in range(3):
            self.run(input_ids=ids)
        run_ms = []
        for _ in range(runs):
            t = time.perf_counter()
            self.run(input_ids=ids)
            run_ms.append((time.perf_counter() - t) * 1e3)
        act_ms = []
        order = self.tasks or [None]
        start = self.active
        for i in range(swaps):
            name = order[i % len(order)] if len(order) > 1 else (order[0] if i % 2 else None)
            t = time.perf_counter()
            self.activate(name)
            act_ms.append((time.perf_counter() - t) * 1e3)
        self.activate(start)
        return {"mode": self.mode, "run_median_ms": float(np.median(run_ms)),
                "activate_median_ms": float(np.median(act_ms)), "runs": runs, "swaps": swaps,
                "threads": self.threads}


def _module_dims(modules: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} from a manifest's module -> weight-location map."""
    return {m: Location.from_json(d).dims(tuple(d["shape"])) for m, d in modules.items()}


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set whose mass reaches top_p
    choice = order[keep]
    q = p[choice] / p[choice].sum()
    return int(rng.choice(choice, p=q))
