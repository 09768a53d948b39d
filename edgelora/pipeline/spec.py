"""``PIPELINE.toml``: the base, the tasks (an adapter folder, or a training spec), the targets, an eval set per
task, and the gates every cell must pass. Read into frozen dataclasses; every error is one line naming the
field (``PIPELINE.toml: tasks.mood.train.r = 0 must be an integer ≥ 1``). The same rules are published as JSON
Schema in ``pipeline.schema.json`` beside this file (``tests/test_build.py`` holds the two to agreement).

Paths are relative to the pipeline file's folder. A data selection is a file, or a table
``{file, rows, offset, labels, seed}``: the file's rows whose label is in ``labels`` (all when absent),
shuffled with ``seed``, then ``rows`` of them from ``offset`` — so a training set and an eval set drawn from one
file with disjoint ``offset`` ranges never share a row.
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeloraError
from ..format.manifest import TASK_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCHEMA = "pipeline.schema.json"
GATES = {  # name -> what it bounds (the report's words)
    "max_accuracy_drop": "accuracy drop vs PyTorch, points",
    "min_accuracy": "accuracy on the task's eval set, 0..1",
    "max_latency_ratio": "task engine latency / base engine latency",
    "max_engine_mb": "task engine size, MB (the weights it reads)",
    "max_bundle_mb": "the target's device bundle, MB",
}
TRAIN_KEYS = {  # training hyper-parameter -> (check, what it must be); each is a TrainConfig field
    "r": (lambda v: _int(v) and v >= 1, "an integer ≥ 1"),
    "alpha": (lambda v: _num(v) and v > 0, "a number > 0"),
    "targets": (lambda v: isinstance(v, list) and v and all(isinstance(x, str) and x for x in v),
                "a non-empty list of module names"),
    "dropout": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lr": (lambda v: _num(v) and v > 0, "a number > 0"),
    "batch_size": (lambda v: _int(v) and v >= 1, "an integer ≥ 1"),
    "epochs": (lambda v: _int(v) and v >= 1, "an integer ≥ 1"),
    "max_steps": (lambda v: _int(v) and v >= 1, "an integer ≥ 1"),
    "max_length": (lambda v: _int(v) and v >= 2, "an integer ≥ 2"),
    "seed": (lambda v: _int(v) and v >= 0, "an integer ≥ 0"),
    "warmup_ratio": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "pooling": (lambda v: v in ("cls", "mean"), '"cls" or "mean" (default: the base\'s own)'),
}


@dataclass(frozen=True)
class DataSelection:
    file: Path
    rows: int | None = None
    offset: int = 0
    labels: tuple[str, ...] | None = None
    seed: int = 0

    @property
    def whole(self) -> bool:
        return self.rows is None and self.offset == 0 and self.labels is None

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.file), "rows": self.rows, "offset": self.offset,
                "labels": list(self.labels) if self.labels else None, "seed": self.seed}


@dataclass(frozen=True)
class TrainSpec:
    data: DataSelection
    params: dict[str, Any]  # TrainConfig fields

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data.to_json(), "params": dict(sorted(self.params.items()))}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    adapter: Path | None
    train: TrainSpec | None
    eval: DataSelection | None
    gates: dict[str, float]  # the pipeline's gates with this task's overrides
    # static int8 targets' calibration texts (default: the task's training data, where it is trained here)
    calibrate: DataSelection | None = None


@dataclass(frozen=True)
class Pipeline:
    source: Path
    base: str | None  # None: the bundled default base
    targets: tuple[str, ...]
    output: Path
    cache: Path
    threads: int
    latency_runs: int
    bundle: bool
    gates: dict[str, float]
    tasks: dict[str, TaskSpec] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, str]]:
        """(task, target) for every cell, tasks in file order, then targets."""
        return [(t, g) for t in self.tasks for g in self.targets]


class _Table:
    """A TOML table at ``field`` of the pipeline file ``where``; typed getters name the field."""

    def __init__(self, value: Any, field: str, where: str, allowed: set[str]) -> None:
        self.where, self.field = where, field
        if not isinstance(value, dict):
            raise self.error(field, value, "a table")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise EdgeloraError(f"{where}: unknown field {self.name(unknown[0])}; known: {', '.join(sorted(allowed))}")
        self.d = value

    def name(self, key: str) -> str:
        return f"{self.field}.{key}" if self.field else key

    def error(self, name: str, value: Any, what: str) -> EdgeloraError:
        shown = repr(value) if not isinstance(value, dict) else "a table"
        return EdgeloraError(f"{self.where}: {name or 'the file'} = {shown:.60} must be {what}")

    def get(self, key: str, check: Callable[[Any], Any], what: str, default: Any = None) -> Any:
        if key not in self.d:
            return default
        value = self.d[key]
        if not check(value):
            raise self.error(self.name(key), value, what)
        return value


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != "" and "\x00" not in v


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"pipeline file {path} does not exist; pass the path of a PIPELINE.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EdgeloraError(f"{path}: not UTF-8 text; save the pipeline file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeloraError(f"{path}: not valid TOML ({exc})") from None
    return parse_pipeline(raw, path)


# complexity: one flat reader of the whole file, a branch per field it checks
def parse_pipeline(raw: Any, path: Path) -> Pipeline:  # noqa: C901
    where, root = str(path), path.parent
    top = _Table(raw, "", where, {"base", "targets", "output", "cache", "threads", "latency_runs", "bundle",
                                  "gates", "tasks"})
    targets = top.get("targets", lambda v: isinstance(v, list) and v and all(_text(x) for x in v),
                      "a non-empty list of target names or files")
    if targets is None:
        raise EdgeloraError(f"{where}: field targets is missing; add targets = [\"cpu-int8\", ...]")
    if len(set(targets)) != len(targets):
        raise EdgeloraError(f"{where}: targets lists {targets!r:.60} with a repeat; name each target once")
    targets = tuple(_target_ref(t, root) for t in targets)
    gates = _gates(top.d.get("gates", {}), "gates", where, {})
    settings = {
        "base": top.get("base", _text, "a base model folder or 'bundled'"),
        "output": (root / top.get("output", _text, "a folder path", "build/engines")).resolve(),
        "cache": (root / top.get("cache", _text, "a folder path", ".edgelora-cache")).resolve(),
        "threads": top.get("threads", lambda v: _int(v) and 1 <= v <= 256, "an integer in 1..256", 1),
        "latency_runs": top.get("latency_runs", lambda v: _int(v) and 1 <= v <= 10000, "an integer in 1..10000", 30),
        "bundle": top.get("bundle", lambda v: isinstance(v, bool), "true or false", True),
    }
    tasks_raw = top.get("tasks", lambda v: isinstance(v, dict) and v, "a table of [tasks.NAME] tables")
    if tasks_raw is None:
        raise EdgeloraError(f"{where}: no [tasks.NAME] table; add one per task (adapter = ... or [tasks.NAME.train])")
    tasks = {}
    for name, value in tasks_raw.items():
        if not TASK_NAME.fullmatch(name) or name == "base":
            raise EdgeloraError(f"{where}: task name tasks.{name!r:.40} is not usable as a folder name; use "
                                "letters, digits, . _ - (not starting with . _ -)")
        tasks[name] = _task(name, value, where, root, gates)
    return Pipeline(source=path.resolve(), targets=targets, gates=gates, tasks=tasks, **settings)


def _target_ref(spec: str, root: Path) -> str:
    """A bundled target name as it is, a file path made absolute (relative to the pipeline file)."""
    if spec.endswith(".toml") or "/" in spec:
        return str((root / spec).resolve())
    return spec


def _gates(value: Any, name: str, where: str, inherited: dict[str, float]) -> dict[str, float]:
    t = _Table(value, name, where, set(GATES))
    out = dict(inherited)
    for key in GATES:
        bound = "in [0, 1]" if key == "min_accuracy" else "≥ 0"
        got = t.get(key, lambda v, k=key: _num(v) and v >= 0 and (k != "min_accuracy" or v <= 1),
                    f"a number {bound}")
        if got is not None:
            out[key] = float(got)
    return out


def _task(name: str, value: Any, where: str, root: Path, gates: dict[str, float]) -> TaskSpec:
    field_ = f"tasks.{name}"
    t = _Table(value, field_, where, {"adapter", "train", "eval", "calibrate", "gates"})
    adapter = t.get("adapter", _text, "the path of a PEFT adapter folder")
    if (adapter is None) == ("train" not in t.d):
        raise EdgeloraError(f"{where}: {field_} needs exactly one of adapter = \"folder\" or a [{field_}.train] "
                            "table")
    train = None
    if "train" in t.d:
        tr = _Table(t.d["train"], f"{field_}.train", where, {"data", *TRAIN_KEYS})
        if "data" not in tr.d:
            raise EdgeloraError(f"{where}: field {field_}.train.data is missing; name the training file")
        params = {k: tr.get(k, *TRAIN_KEYS[k]) for k in TRAIN_KEYS if k in tr.d}
        if "targets" in params:
            params["targets"] = tuple(params["targets"])
        train = TrainSpec(_selection(tr.d["data"], f"{field_}.train.data", where, root), params)
    elif not (root / adapter / "adapter_config.json").is_file():
        raise EdgeloraError(f"{where}: {field_}.adapter = {adapter!r:.60}: no adapter_config.json in "
                            f"{root / adapter}; give a PEFT adapter folder (relative to the pipeline file)")
    ev = _selection(t.d["eval"], f"{field_}.eval", where, root) if "eval" in t.d else None
    cal = _selection(t.d["calibrate"], f"{field_}.calibrate", where, root) if "calibrate" in t.d else None
    return TaskSpec(name, (root / adapter).resolve() if adapter else None, train, ev,
                    _gates(t.d.get("gates", {}), f"{field_}.gates", where, gates), cal)


def _selection(value: Any, field_: str, where: str, root: Path) -> DataSelection:
    if isinstance(value, str):
        value = {"file": value}
    s = _Table(value, field_, where, {"file", "rows", "offset", "labels", "seed"})
    file = s.get("file", _text, "a data file path")
    if file is None:
        raise EdgeloraError(f"{where}: field {field_}.file is missing; name a labelled TSV/CSV/JSONL file")
    path = (root / file).resolve()
    if not path.is_file():
        raise EdgeloraError(f"{where}: {field_}.file = {file!r:.60}: {path} does not exist")
    labels = s.get("labels", lambda v: isinstance(v, list) and len(v) >= 2 and all(_text(x) for x in v)
                   and len(set(v)) == len(v), "a list of ≥ 2 distinct label values")
    return DataSelection(path, s.get("rows", lambda v: _int(v) and v >= 1, "an integer ≥ 1"),
                         s.get("offset", lambda v: _int(v) and v >= 0, "an integer ≥ 0", 0),
                         tuple(labels) if labels else None, s.get("seed", lambda v: _int(v) and v >= 0,
                                                                  "an integer ≥ 0", 0))


def pipeline_inputs(pipeline: Pipeline, base_path: Path | None) -> list[tuple[str, Path | None]]:
    """(what, path) of everything a build reads: the pipeline file, the base, target files, adapter folders and
    data files."""
    out: list[tuple[str, Path | None]] = [("pipeline file", pipeline.source), ("base", base_path)]
    out += [("target file", Path(t)) for t in pipeline.targets if t.endswith(".toml") or "/" in t]
    for name, t in pipeline.tasks.items():
        out += [(f"adapter of tasks.{name}", t.adapter), (f"eval file of tasks.{name}", t.eval and t.eval.file),
                (f"training data of tasks.{name}", t.train and t.train.data.file),
                (f"calibration file of tasks.{name}", t.calibrate and t.calibrate.file)]
    return out


def check_outputs(pipeline: Pipeline, labels: list[str], base_path: Path | None) -> None:
    """Refuse a build whose output would destroy what it reads, before any cell is built: the output folder (written
    into beside what is there: new, empty or an earlier build's) and each target's deployment folder and bundle
    (replaced whole: absent, empty or edgelora's) may not be, contain or lie inside an input, the cache excepted
    where it is only contained (``output = "build"``, ``cache = "build/cache"``); never ``/`` or a home folder."""
    from ..fsutil import check_output

    inputs = pipeline_inputs(pipeline, base_path)
    where = f"{pipeline.source.name}: output"
    out = pipeline.output
    check_output(out, inputs=inputs, replace=False, name=where)
    if pipeline.cache.resolve() == out.resolve() or out.resolve().is_relative_to(pipeline.cache.resolve()):
        raise EdgeloraError(f"{where} {out} is or lies inside the cache {pipeline.cache}; give each its own folder")
    for label in labels:
        for folder in (out / label, *([out / f"{label}.bundle"] if pipeline.bundle else [])):
            check_output(folder, force=True, inputs=[*inputs, ("cache", pipeline.cache)], name=where)


def only_cell(spec: str, pipeline: Pipeline) -> tuple[str, str]:
    """``--only TASK/TARGET`` checked against the pipeline's cells."""
    m = re.fullmatch(r"([^/]+)/(.+)", spec)
    cells = pipeline.cells()
    names = {(t, _target_label(g)): (t, g) for t, g in cells}
    if not m or (m.group(1), m.group(2)) not in names:
        shown = ", ".join(f"{t}/{_target_label(g)}" for t, g in cells[:6])
        raise EdgeloraError(f"--only {spec}: not a cell of {pipeline.source.name}; cells: {shown}"
                            + (" ..." if len(cells) > 6 else ""))
    return names[(m.group(1), m.group(2))]


def _target_label(target: str) -> str:
    return Path(target).stem if target.endswith(".toml") else target


target_label = _target_label


def selected_rows(sel: DataSelection, labels: Sequence[str]) -> list[int]:
    """The row indices (into the file's examples, whose labels are ``labels``) a selection takes: the rows whose
    label it keeps, shuffled with its seed, ``rows`` of them from ``offset`` (the build's rule for writing it)."""
    keep = [i for i, label in enumerate(labels) if sel.labels is None or label in sel.labels]
    random.Random(sel.seed).shuffle(keep)
    want = sel.rows if sel.rows is not None else len(keep) - sel.offset
    return keep[sel.offset:sel.offset + want]


def check_overlaps(pipeline: Pipeline) -> None:
    """Refuse a task whose eval selection shares rows with its training selection: its accuracy gates would be
    measured on data it was trained on. Selections of one file are compared row by row (a file is read once)."""
    from ..data import read_classification

    labels: dict[Path, list[str]] = {}
    for name, t in pipeline.tasks.items():
        if t.train is None or t.eval is None or t.train.data.file != t.eval.file:
            continue
        file = t.eval.file
        if file not in labels:
            labels[file] = [e.label for e in read_classification(file)]
        train, ev = set(selected_rows(t.train.data, labels[file])), selected_rows(t.eval, labels[file])
        shared = sum(1 for i in ev if i in train)
        if shared:
            raise EdgeloraError(f"{pipeline.source.name}: tasks.{name}: {shared} of its {len(ev)} eval rows are also "
                                f"training rows ({file.name}); give tasks.{name}.eval an offset past the training "
                                "rows, or another file: the gates would be measured on training data")
