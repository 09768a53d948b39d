"""``edgelora export``: one base engine, a delta per task, baked per-task engines, a verified report.

The work is a list of steps over one context (``steps.py``, read top to bottom): check the request, read and
check every adapter against the base, build the base engine and its name map, the runtime's branch and swap
graphs, then per task the delta, the branch check, the baked engine (the base engine patched with
``W0 + s·B·A`` — seconds — or, where patching cannot apply, the merged model exported again) and its checks
against PyTorch; the manifest, the on-device runtime checked against every baked engine, the report. Engine
work goes through the backend the target names (``edgelora.converters``). Every check runs before the folder
is published; a task outside its tolerance fails the export (exit 1) and leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import EdgeloraError
from ..fsutil import atomic_output_dir, check_output, scratch_dir
from ..target import Target
from .context import ExportContext
from .report import engine_size, format_table, report_markdown, report_rows
from .steps import BUILD_STEPS, check_request, read_adapters, read_calibration

__all__ = ["ExportFailed", "ExportResult", "default_adapters", "engine_size", "export", "format_table",
           "report_markdown", "report_rows"]


class ExportFailed(EdgeloraError):
    """An engine missed its target's tolerance (exit status 1, not a usage error)."""

    exit_code = 1


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any]
    seconds: float
    failures: list[str] = field(default_factory=list)


def example_adapters_dir() -> Path:
    """The example adapters: installed with the package (``examples/adapters`` ships as ``edgelora/examples``),
    or in the checkout (an editable install)."""
    installed = Path(str(resources.files("edgelora") / "examples"))
    if any(installed.glob("*/adapter_config.json")):
        return installed
    return Path(__file__).resolve().parents[2] / "examples" / "adapters"


def default_adapters() -> dict[str, Path]:
    """The example adapters shipped with edgelora (the no-argument export)."""
    folder = example_adapters_dir()
    found = {p.name: p for p in sorted(folder.glob("*")) if (p / "adapter_config.json").is_file()}
    if not found:
        raise EdgeloraError(f"no example adapters in {folder}; pass --adapter NAME=PATH")
    return found


def export(
    base: str | os.PathLike[str] | None,
    adapters: Mapping[str, str | os.PathLike[str]],
    target: Target,
    output: str | os.PathLike[str],
    *,
    evals: Mapping[str, str | os.PathLike[str]] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
    latency_runs: int = 30,
    keep_failed: bool = False,
    bake: str = "auto",
    calibrate: Mapping[str, str | os.PathLike[str]] | None = None,
) -> ExportResult:
    """Export ``adapters`` (name -> PEFT folder) over ``base`` for ``target`` into ``output``. ``bake``: "auto"
    patches the base engine into each task engine where the backend can (else re-exports the merged model);
    "reexport" always re-exports (slow: the reference the patched engines are checked against). ``calibrate``:
    static int8 targets' texts, task name ("" for every task) -> file (see ``export/calibration.py``)."""
    if bake not in ("auto", "reexport"):
        raise EdgeloraError(f"bake = {bake!r}; use 'auto' or 'reexport'")
    from ..base import resolve_base
    from ..converters import get_backend

    output = Path(output)
    check_output(output, force=force, inputs=[
        ("base", resolve_base(base)), ("target file", target.source or None),
        *((f"adapter {n}", p) for n, p in adapters.items()),
        *((f"eval file of {n}", p) for n, p in (evals or {}).items()),
        *((f"calibration file of {n or 'every task'}", p) for n, p in (calibrate or {}).items())])
    ctx = ExportContext(base, {k: Path(v) for k, v in adapters.items()}, target, output,
                        {k: Path(v) for k, v in (evals or {}).items()}, threads, latency_runs, allow_pickle,
                        progress or (lambda step: None), backend=get_backend(target.backend),
                        started=time.perf_counter(), bake=bake,
                        calibrate={k: Path(v) for k, v in (calibrate or {}).items()})
    check_request(ctx)
    read_adapters(ctx)  # every adapter read and checked against the base before any work
    read_calibration(ctx)
    with atomic_output_dir(output, force=force) as out, scratch_dir(out) as work:
        ctx.out, ctx.work = out, work
        for step in getattr(ctx.backend, "steps", BUILD_STEPS):  # a backend may bring its own (executorch)
            step(ctx)
        if ctx.failures and not keep_failed:
            raise ExportFailed(_failure_message(ctx))
    if ctx.failures:  # kept on request: the folder is there to inspect, the status still says it failed
        raise ExportFailed(_failure_message(ctx) + f" (kept in {output})")
    return ExportResult(output, ctx.report, time.perf_counter() - ctx.started, ctx.failures)


def _failure_message(ctx: ExportContext) -> str:
    return (f"export to {ctx.target.name} failed verification: " + " | ".join(ctx.failures)
            + f"; tolerances are in {ctx.target.source}")
