"""``edgelora build PIPELINE.toml``: the matrix of tasks × targets, stage by stage, every cell from the cache when
none of its inputs changed.

1. data      each data selection written once to the cache (``cache/data``)
2. train     the adapters the pipeline trains
3. base      per target: the export's base stage over every task's LoRA targets
4. task      per task × target: the task's stage (delta, baked engine, checks, accuracy)
5. folder    per target: the deployment folder and device bundle, in the output folder
6. report    gates, ``report.md`` / ``report.json`` / charts, the console table

A cell's key is the sha256 of every input that can change it (the base's weights, the adapter's files or the
training data and hyper-parameters, the target file, the eval data, the thread count, the edgelora version) and of
the keys of the cells it reads, so a change rebuilds exactly the cells downstream of it.

The cache is not trusted: a cell read from it must hold its own record and, when the build holds a key
(``EDGELORA_CACHE_KEY``), a valid signature (``cache.py``); the cells this build makes are signed. A folder is
published only after it is checked against what this build re-derives (``rederive.py``); a cell that fails either
is rebuilt and reported (``cache: cell task/sst2/cpu-int8 failed its signature: rebuilt``), and the folder
assembled again. The gates read the re-derived numbers.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import EdgeloraError
from .cache import Cache, atomic_write_text, digest, file_sha256, folder_sha256, signing_key
from .executors import make_executor
from .spec import DataSelection, Pipeline, check_outputs, check_overlaps, load_pipeline, only_cell

STAMP = ".edgelora-build.json"  # in the output folder: which cells each deployment folder was assembled from
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "edgelora.json")


@dataclass
class Cell:
    kind: str
    name: str  # "task", "target", "task/target"
    key: str = ""
    job: dict[str, Any] = field(default_factory=dict)
    built: bool = False
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 1  # of its error: 2 when the cell's input is bad
    suspects: dict[str, str] | None = None  # folder: cells from the cache its checks proved wrong -> why
    rederived: dict[str, Any] | None = None  # folder: what this build re-derived (rederive.check_folder)

    @property
    def full_name(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class BuildResult:
    pipeline: Pipeline
    report: dict[str, Any]
    failures: list[str]  # every cell that could not be built, then every missed gate
    seconds: float

    @property
    def exit_code(self) -> int:
        """0: every gate holds; 2: a cell's input is bad (an adapter for another base, a bad eval file); 1: else."""
        if not self.failures:
            return 0
        return 2 if any(e["exit_code"] == 2 for e in self.report["errors"]) else 1


def emit_matrix(path: str | Path) -> dict[str, Any]:
    """The cells as a CI job matrix: ``{"include": [{"cell", "task", "target"}, ...]}``."""
    from ..target import load_target

    p = load_pipeline(path)
    names = {ref: load_target(ref).name for ref in p.targets}
    return {"include": [{"cell": f"{t}/{names[g]}", "task": t, "target": names[g]} for t, g in p.cells()]}


class Build:
    def __init__(self, path: str | Path, *, jobs: int = 1, executor: str = "local", ray_address: str | None = None,
                 force: bool = False, only: str | None = None, prepare: bool = False, quiet: bool = False,
                 cache: str | Path | None = None, output: str | Path | None = None) -> None:
        from ..base import fingerprint, resolve_base
        from ..target import load_target

        if jobs < 1:
            raise EdgeloraError(f"--jobs {jobs}: give 1 or more worker processes")
        self.started = time.perf_counter()
        self.p = load_pipeline(path)
        if cache is not None or output is not None:  # the command line's --cache / --output win over the file's
            self.p = replace(self.p, cache=Path(cache) if cache is not None else self.p.cache,
                             output=Path(output) if output is not None else self.p.output)
        self.targets = {ref: load_target(ref) for ref in self.p.targets}
        self.labels = {ref: t.name for ref, t in self.targets.items()}
        if len(set(self.labels.values())) != len(self.labels):
            raise EdgeloraError(f"{self.p.source}: two targets share the name {sorted(self.labels.values())}; "
                                "give each target file its own name")
        self.only = only_cell(only, self.p) if only else None
        self.prepare, self.force, self.quiet = prepare, force, quiet
        self.cache = Cache(self.p.cache.resolve())
        self.base_path = resolve_base(self.p.base)
        if only is None and not prepare:  # the only runs that write the output folder
            check_outputs(self.p, list(self.labels.values()), self.base_path)
        check_overlaps(self.p)  # before a cell is trained on rows its gates would then be measured on
        self.base_fp = fingerprint(self.base_path)
        self.jobs, self.executor_kind, self.ray_address = jobs, executor, ray_address
        self.executor: Any = None
        self.cells: list[Cell] = []
        self.adapters: dict[str, Path] = {}
        self.evals: dict[str, tuple[Path, str]] = {}  # task -> (file, key)
        self.bar: Any = None
        self._module_set: set[str] | None = None
        self.secret = signing_key()
        self.cache_notes: list[str] = []  # one line per cell (or data file) the cache held wrong, and what was done
        self.rederived: dict[str, dict[str, Any]] = {}  # target label -> re-derived numbers of its folder
        self._stale_records: dict[str, str] = {}  # cells whose record disagrees with their folder's numbers

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> BuildResult:
        from .report import write_report

        self.cache.cleanup()
        try:
            self._data()
            self._stage([self._train_cell(n) for n, t in self.p.tasks.items() if t.train is not None])
            for name, t in self.p.tasks.items():
                self.adapters[name] = (self.cache.path("train", self.train_key(name)) / "adapter"
                                       if t.train is not None else t.adapter)  # type: ignore[assignment]
            if not self._failed("train"):
                self._stage([self._base_cell(ref) for ref in self.targets_to_build()])
                if not self.prepare:
                    self._stage([self._task_cell(n, ref) for n, ref in self._task_cells()])
                    if self.only is None:
                        self._stage([self._folder_cell(ref) for ref in self.p.targets])
                        self._retry_suspects()
        finally:
            if self.executor is not None:
                self.executor.close()
            if self.bar is not None:
                self.bar.close()
        report = write_report(self)
        return BuildResult(self.p, report, report["failures"], report["wall_seconds"])

    def targets_to_build(self) -> list[str]:
        return [self.only[1]] if self.only else list(self.p.targets)

    def _task_cells(self) -> list[tuple[str, str]]:
        return [self.only] if self.only else self.p.cells()

    def _failed(self, kind: str) -> bool:
        return any(c.error for c in self.cells if c.kind == kind)

    def _stage(self, cells: list[Cell | None]) -> None:
        todo = []
        for cell in cells:
            if cell is None:
                continue
            self.cells.append(cell)
            if cell.kind == "folder" and cell.job.get("fresh"):
                self._tick(cell)
            elif cell.kind != "folder" and not cell.job.get("force") and self.cache.has(cell.kind, cell.key):
                why = self.cache.distrust(cell.kind, cell.key, self.secret)
                if why is None:
                    self._tick(cell)
                else:
                    self.cache_notes.append(f"cache: cell {cell.full_name} {why}: rebuilt")
                    cell.job = {**cell.job, "force": True}
                    todo.append(cell)
            else:
                todo.append(cell)
        if not todo:
            return
        if self.executor is None:
            self.executor = make_executor(self.executor_kind, self.jobs, self.ray_address)
        by_job = {id(c.job): c for c in todo}
        for job, result in self.executor.run([c.job for c in todo]):
            cell = by_job[id(job)]
            cell.built, cell.seconds, cell.error = result.get("built", False), result.get("seconds", 0.0), \
                result.get("error")
            cell.exit_code = result.get("exit_code", 1)
            cell.suspects, cell.rederived = result.get("suspects"), result.get("rederived")
            if cell.kind == "folder" and not cell.error:
                self.rederived[cell.name] = result["rederived"]
                self._stamp(cell)
            elif cell.built and not cell.error and self.secret is not None:
                self.cache.sign(cell.kind, cell.key, self.secret)
            self._tick(cell)

    def _retry_suspects(self) -> None:
        """Rebuild the cells an assembled folder proved wrong (and those whose record disagrees with their
        published folder's numbers), then assemble those folders again. A cell this build made is trusted by the
        check, so a second miss is either a quality failure (reported, published) or a cell that could not be
        rebuilt: the build fails naming it."""
        wrong = dict(self._stale_records)
        while True:  # each round rebuilds at least one cell (a rebuilt cell is trusted): it ends
            failed = [c for c in self.cells if c.kind == "folder" and c.suspects]
            wrong |= {n: why for c in failed for n, why in (c.suspects or {}).items()}
            by_name = {c.full_name: c for c in self.cells if c.kind != "folder" and not c.built}
            todo = {n: why for n, why in wrong.items() if n in by_name}
            if not todo:
                return
            for kind in ("train", "base", "task"):  # what a cell reads is rebuilt before it
                cells = [by_name[n] for n in todo if by_name[n].kind == kind]
                for c in cells:
                    self.cache_notes.append(f"cache: cell {c.full_name} {todo[c.full_name]}: rebuilt")
                    self.cells.remove(c)
                    c.job, c.error = {**c.job, "force": True}, None
                self._stage(list(cells))
            for c in failed:
                self.cells.remove(c)
            by_label = {label: ref for ref, label in self.labels.items()}
            self._stage([self._folder_cell(by_label[c.name]) for c in failed])
            wrong = {}

    def _tick(self, cell: Cell) -> None:
        if self.bar is None and not self.quiet:
            from tqdm import tqdm

            trained = sum(1 for t in self.p.tasks.values() if t.train is not None)
            targets = len(self.targets_to_build())
            total = trained + targets + (0 if self.prepare else len(self._task_cells()) + (
                0 if self.only else targets))
            self.bar = tqdm(total=total, desc="cells", unit="cell", file=sys.stderr, leave=False)
        if self.bar is not None:
            state = "failed" if cell.error else "built" if cell.built else "cached"
            self.bar.set_postfix_str(f"{cell.kind} {cell.name} ({state})")
            self.bar.update(1)

    # ------------------------------------------------------------------------------------------ cells
    def _job(self, kind: str, **kw: Any) -> dict[str, Any]:
        return {"kind": kind, "cache": str(self.cache.root), "threads": self.p.threads, "force": self.force,
                "pipeline": self.p.source.name, "latency_runs": self.p.latency_runs, **kw}

    def _data(self) -> None:
        """Each task's training and eval selection as a file (the selection itself where it is a whole file)."""
        self._train_data: dict[str, tuple[Path, str]] = {}  # task -> (file, key)
        self._calibration: dict[str, tuple[Path, str]] = {}  # task -> (file, key): static int8 targets' texts
        for name, t in self.p.tasks.items():
            if t.train is not None:
                self._train_data[name] = self._materialize(t.train.data, f"tasks.{name}.train.data")
            if t.eval is not None:
                self.evals[name] = self._materialize(t.eval, f"tasks.{name}.eval")
            if t.calibrate is not None:
                self._calibration[name] = self._materialize(t.calibrate, f"tasks.{name}.calibrate")
            elif name in self._train_data:  # training texts: what a static int8 target calibrates on by default
                self._calibration[name] = self._train_data[name]
        static = [self.labels[ref] for ref in self.targets if self._static(ref)]
        missing = [n for n in self.p.tasks if n not in self._calibration]
        if static and missing:
            raise EdgeloraError(f"{self.p.source}: target {static[0]} is static int8 and task {missing[0]} has no "
                                f"calibration texts; add calibrate = \"FILE\" (or a selection) to [tasks.{missing[0]}]")

    def _materialize(self, sel: DataSelection, field_: str) -> tuple[Path, str]:
        from ..data import read_classification

        key = digest("data", file_sha256(sel.file), {**sel.to_json(), "file": None})
        if sel.whole:
            return sel.file, key
        out = self.cache.root / "data" / f"{key[:32]}.jsonl"
        # made again on every build (milliseconds) and compared: the file in the cache is not trusted
        rows = [e for e in read_classification(sel.file) if sel.labels is None or e.label in sel.labels]
        random.Random(sel.seed).shuffle(rows)
        want = sel.rows if sel.rows is not None else len(rows) - sel.offset
        if sel.offset + want > len(rows) or want < 1:
            raise EdgeloraError(f"{self.p.source}: {field_} asks for {want} rows from offset {sel.offset}; "
                                f"{sel.file.name} has {len(rows)} matching rows")
        text = "".join(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n"
                       for e in rows[sel.offset:sel.offset + want])
        try:
            held = out.read_text(encoding="utf-8") if out.is_file() else None
        except (OSError, ValueError):
            held = ""
        if held == text:
            return out, key
        if held is not None:
            self.cache_notes.append(f"cache: data {out.name} ({field_}) differs from its selection: rewritten")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        return out, key

    def _train_cell(self, name: str) -> Cell:
        t = self.p.tasks[name]
        assert t.train is not None
        key = self.train_key(name)
        data = self._train_data[name][0]
        return Cell("train", name, key, self._job("train", key=key, name=name, data=str(data),
                                                   params=t.train.params, base=self.p.base))

    def train_key(self, name: str) -> str:
        t = self.p.tasks[name]
        assert t.train is not None
        return digest("train", self.base_fp, self._train_data[name][1], t.train.to_json()["params"], self.p.threads)

    def base_key(self, ref: str) -> str:
        return digest("base", self.base_fp, file_sha256(self.targets[ref].source), sorted(self._modules()),
                      self.p.threads, self.p.latency_runs,
                      sorted((n, key) for n, (_, key) in self._calibration.items()) if self._static(ref) else None)

    def task_key(self, name: str, ref: str) -> str:
        adapter = self.adapters[name]
        present = [f for f in ADAPTER_FILES if (adapter / f).is_file()]
        return digest("task", self.base_key(ref), folder_sha256(adapter, present), name,
                      self.evals[name][1] if name in self.evals else None)

    def _static(self, ref: str) -> bool:
        """A static int8 target: its base and task cells read the tasks' calibration texts."""
        return self.targets[ref].quantization.method == "static"

    def _modules(self) -> set[str]:
        """Every LoRA-target module of every task's adapter, from the adapter files' tensor names."""
        if self._module_set is None:
            from ..hashing import read_safetensors_header

            modules: set[str] = set()
            for name, adapter in self.adapters.items():
                weights = adapter / "adapter_model.safetensors"
                if not weights.is_file():
                    raise EdgeloraError(f"task {name}: {adapter} has no adapter_model.safetensors (edgelora build "
                                        "reads no pickled adapter); save it with safe_serialization=True")
                header, _ = read_safetensors_header(weights)
                modules |= {k.split(".lora_", 1)[0] for k in header if ".lora_" in k}
            self._module_set = modules
        return self._module_set

    def _base_cell(self, ref: str) -> Cell:
        key = self.base_key(ref)
        return Cell("base", self.labels[ref], key, self._job(
            "base", key=key, base=self.p.base, target=ref, target_label=self.labels[ref],
            adapters={n: str(p) for n, p in self.adapters.items()},
            calibrate={n: str(p) for n, (p, _) in self._calibration.items()} if self._static(ref) else {}))

    def _task_cell(self, name: str, ref: str) -> Cell | None:
        if self._base_failed(ref):
            return None
        key = self.task_key(name, ref)
        base_cell = self.cache.path("base", self.base_key(ref))
        return Cell("task", f"{name}/{self.labels[ref]}", key, self._job(
            "task", key=key, name=name, adapter=str(self.adapters[name]), target=ref,
            target_label=self.labels[ref], base_cell=str(base_cell),
            eval=str(self.evals[name][0]) if name in self.evals else None,
            calibrate=str(self._calibration[name][0]) if self._static(ref) and name in self._calibration else None))

    def _base_failed(self, ref: str) -> bool:
        return any(c.error for c in self.cells if c.kind == "base" and c.name == self.labels[ref])

    def _folder_cell(self, ref: str) -> Cell | None:
        label = self.labels[ref]
        if self._base_failed(ref) or any(c.error for c in self.cells if c.kind == "task"
                                         and c.name.endswith(f"/{label}")):
            return None
        tasks = {n: str(self.cache.path("task", self.task_key(n, ref))) for n in self.p.tasks}
        key = digest("folder", self.base_key(ref), list(tasks.items()), self.p.bundle)  # in file order
        output = self.p.output.resolve() / label
        why = "asked for (--force)" if self.force else self._stamped(label, key, output)
        if why is None:
            self._check_records(label, tasks)
        inputs = {n: {"adapter": str(self.adapters[n]), "eval": str(self.evals[n][0]) if n in self.evals else None,
                      "calibrate": str(self._calibration[n][0]) if self._static(ref) and n in self._calibration
                      else None} for n in self.p.tasks}
        return Cell("folder", label, key, self._job(
            "folder", key=key, target=ref, target_label=label, output=str(output), bundle=self.p.bundle,
            base_cell=str(self.cache.path("base", self.base_key(ref))), task_cells=tasks, base=self.p.base,
            tasks=inputs, trusted=sorted(c.full_name for c in self.cells if c.built and not c.error),
            fresh=why is None, why=why))

    def _check_records(self, label: str, task_cells: dict[str, str]) -> None:
        """An unchanged folder's numbers were re-derived when it was published (its stamp): a task cell whose
        record says otherwise is not what it claims, and is rebuilt (the folder, intact, is kept)."""
        from ..export.stages import task_state

        numbers = self.rederived[label].get("tasks") or {}
        for n, path in task_cells.items():
            want = numbers.get(n, {}).get("accuracy")
            try:
                held = task_state(Path(path))["report"].get("accuracy")
            except (EdgeloraError, KeyError, TypeError):
                held = "unreadable"
            if want is not None and held != want:
                self._stale_records[f"task/{n}/{label}"] = f"records accuracy {held}, its published engine " \
                                                           f"measured {want:.4g}"

    # ------------------------------------------------------------------------------------------ the output
    def _stamps(self) -> dict[str, Any]:
        try:
            return json.loads((self.p.output / STAMP).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _stamped(self, label: str, key: str, output: Path) -> str | None:
        """None when the deployment folder was assembled from exactly these cells and is intact (its manifest as
        written, every file it lists of the size and sha256 listed: ``edgelora verify``'s check); else why not."""
        from ..format.files import verify_files
        from ..format.manifest import read_manifest

        stamp = self._stamps().get(label)
        if not stamp:
            return "not built here before"
        if stamp.get("key") != key:
            return "its cells changed"
        if not isinstance(stamp.get("rederived"), dict):
            return "its numbers were not re-derived (an older build)"
        if not (output / "manifest.json").is_file() or file_sha256(output / "manifest.json") != stamp.get(
                "manifest_sha256"):
            return "its manifest changed on disk"
        try:
            verify_files(output, read_manifest(output).files)
        except EdgeloraError as exc:
            return f"a file changed on disk ({str(exc)[:120]})"
        if self.p.bundle and not (output.with_name(output.name + ".bundle") / "manifest.json").is_file():
            return "its device bundle is missing"
        self.rederived[label] = stamp["rederived"]  # re-derived by the build that published these very files
        return None

    def _stamp(self, cell: Cell) -> None:
        stamps = self._stamps()
        output = Path(cell.job["output"])
        stamps[cell.name] = {"key": cell.key, "manifest_sha256": file_sha256(output / "manifest.json"),
                             "rederived": cell.rederived}
        atomic_write_text(self.p.output / STAMP, json.dumps(stamps, indent=1, sort_keys=True))


def build(path: str | Path, **kw: Any) -> BuildResult:
    return Build(path, **kw).run()
