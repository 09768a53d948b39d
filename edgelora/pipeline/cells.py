"""What one cell does, in whichever process or machine runs it: :func:`run_cell` takes a plain dict (a job, JSON
all through, so local worker processes and Ray tasks run the same thing) and returns a plain dict.

Kinds, in the order a build runs them:
- ``train``:  an adapter trained with ``edgelora train``'s code on the task's data selection;
- ``base``:   the base stage of the export for one target (``export/stages.py``);
- ``task``:   one task's stage for one target: delta, baked engine, checks, accuracy on its eval set;
- ``folder``: one target's deployment folder assembled from its base and task cells, checked against what the
              build re-derives (``rederive.py``) before it is published, and its device bundle.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import EdgeloraError
from .cache import Cache
from .rederive import Suspect, base_cell_name, task_cell_name


def _threads(n: int) -> None:
    """Every cell computes with the pipeline's thread count, whatever runs it (a Ray worker starts with one
    OpenMP thread): the same numbers in, the same bytes out."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Build the job's cell in the cache unless it is there; ``{"built": bool, "seconds": float}`` (a folder: with
    ``"rederived"``, what its checks measured) or ``{"error": one line, "exit_code": 2 for bad input (an adapter
    for another base, a bad eval file), else 1}`` (a folder whose checks proved cache cells wrong: with
    ``"suspects"``, cell name -> why, for the build to rebuild them)."""
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")  # library chatter from a worker is not for the build's user (as in the CLI)
    try:
        _threads(job["threads"])
        if job["kind"] == "folder":
            return {"built": True, "rederived": _folder(job), "seconds": round(time.perf_counter() - t0, 2)}
        cache = Cache(Path(job["cache"]))
        make = {"train": _train, "base": _base, "task": _task}[job["kind"]]
        built = cache.build(job["kind"], job["key"], lambda out: make(job, out), force=job.get("force", False))
        return {"built": built, "seconds": round(time.perf_counter() - t0, 2)}
    except Suspect as exc:  # cells from the cache that the assembled folder proves wrong: the build rebuilds them
        return {"error": str(exc), "exit_code": 1, "suspects": exc.cells}
    except EdgeloraError as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    except Exception as exc:  # a bug, not bad input: the cell names it, the build goes on to report
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"error": f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})",
                "exit_code": 1}


def _train(job: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..train import TrainConfig, train

    params = dict(job["params"])
    if "targets" in params:
        params["targets"] = tuple(params["targets"])
    cfg = TrainConfig(**params, threads=job["threads"])
    result = train("sequence-classification", job["data"], out / "adapter", cfg, base=job["base"], force=True,
                   command=f"edgelora build {job['pipeline']} (task {job['name']})", progress=False)
    return {"task": job["name"], "seconds": round(result.seconds, 1), "history": result.history,
            "trainable_parameters": result.trainable_parameters}


def _base(job: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..export.stages import base_stage
    from ..target import load_target

    base_stage(job["base"], {n: Path(p) for n, p in job["adapters"].items()}, load_target(job["target"]), out,
               threads=job["threads"], latency_runs=job["latency_runs"],
               calibrate={n: Path(p) for n, p in job.get("calibrate", {}).items()})
    return {"target": job["target_label"]}


def _task(job: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..export.stages import task_stage
    from ..target import load_target

    task_stage(Path(job["base_cell"]), job["name"], Path(job["adapter"]), load_target(job["target"]), out,
               eval_file=Path(job["eval"]) if job.get("eval") else None, threads=job["threads"],
               latency_runs=job["latency_runs"], calibrate=Path(job["calibrate"]) if job.get("calibrate") else None)
    return {"task": job["name"], "target": job["target_label"]}


def _folder(job: dict[str, Any]) -> dict[str, Any]:
    """The deployment folder (and device bundle) of one target, assembled from its cells, checked against what
    this build re-derives (``rederive.py``) and only then published atomically where the build writes; returns
    the re-derived numbers (the gates read them, not the cells' records)."""
    from ..export.bundle import pack
    from ..export.stages import assemble, task_state
    from ..fsutil import atomic_output_dir, scratch_dir
    from ..target import load_target
    from .rederive import check_folder

    output = Path(job["output"])
    target = load_target(job["target"])
    with atomic_output_dir(output, force=True) as out:
        staged = out / "assembled"  # inside the locked temporary folder: a kill leaves nothing published
        with _blame_unreadable(job):
            tasks = {n: {**t, "accuracy": task_state(Path(job["task_cells"][n]))["report"].get("accuracy")}
                     for n, t in job["tasks"].items()}
            assemble(Path(job["base_cell"]), {n: Path(p) for n, p in job["task_cells"].items()}, target, staged,
                     threads=job["threads"])
        with scratch_dir(out) as scratch:
            rederived = check_folder(staged, base=job["base"], target=target, label=job["target_label"], tasks=tasks,
                                     threads=job["threads"], trusted=set(job["trusted"]), scratch=scratch)
        for child in list(staged.iterdir()):
            os.rename(child, out / child.name)
        staged.rmdir()
    if job["bundle"]:
        pack(output, output.with_name(output.name + ".bundle"), force=True)
    return rederived


@contextlib.contextmanager
def _blame_unreadable(job: dict[str, Any]) -> Iterator[None]:
    """A cell from the cache that cannot even be assembled (a record or state file that does not parse, one
    written by another version of the stage format) is a :class:`Suspect`, for the build to rebuild; one this
    build made is a bug, and its error stands."""
    label = job["target_label"]
    cells = {base_cell_name(label): job["base_cell"],
             **{task_cell_name(n, label): p for n, p in job["task_cells"].items()}}
    try:
        yield
    except EdgeloraError as exc:
        message = str(exc)
        blamed = {name: f"cannot be assembled ({message.replace(path, '').strip(' :/')[:160]})"
                  for name, path in cells.items() if path in message and name not in job["trusted"]}
        if blamed:
            raise Suspect(blamed) from None
        raise
