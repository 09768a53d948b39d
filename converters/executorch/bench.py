"""``edgelora bench`` on an ExecuTorch folder: the ExecuTorch side, over the folder's manifest.

- :func:`open_programs`  the branch program and each task's merged program loaded over the shared base.ptd, each
                         task's delta read into the branch program's feeds (the files checked against the manifest)
- :func:`calls`          one timed call per task and form, on the caller's inputs (``edgelora/bench.py``
                         interleaves them with ONNX Runtime's engines of a ``--beside`` folder)
- :func:`logits`         both forms' logits on the same inputs (parity against PyTorch and ONNX Runtime)
- :func:`file_sizes`, :func:`export_parity`, :func:`switch`  what a task costs on disk, what the export
                         measured against PEFT, task switch times (:func:`export.switch_times`)
- :func:`table`          the text ``edgelora bench`` prints (``benchmarks/executorch_target.py`` prints it too)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.errors import DeploymentError
from edgelora.format.delta import read_delta
from edgelora.format.files import FileEntry, check_sizes
from edgelora.format.layout import REPORT_JSON

from . import runner
from .export import branch_feeds, switch_times
from .layout import BASE_DATA, FORMAT_VERSION

FORMS = ("merged", "branches")


@dataclass
class Programs:
    """An ExecuTorch folder opened for timing: its programs loaded, each task's branch feeds built."""

    folder: Path
    manifest: dict[str, Any]
    branch: Any  # the branch program's forward
    merged: dict[str, Any]  # task -> its merged program's forward
    feeds: dict[str, list[Any]]  # task -> the branch program's extra inputs (torch tensors)

    @property
    def shape(self) -> tuple[int, int]:
        batch, seq = self.manifest["io"]["shape"]
        return int(batch), int(seq)


def open_programs(folder: Path, manifest: dict[str, Any], threads: int) -> Programs:
    where = f"{folder}/manifest.json"
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DeploymentError(f"{where}: ExecuTorch folder format_version {manifest.get('format_version')!r}; "
                              f"this edgelora reads {FORMAT_VERSION}: re-export the folder")
    try:
        files = {rel: FileEntry(int(e["size"]), str(e["sha256"])) for rel, e in manifest["files"].items()}
        br, tasks = manifest["branches"], manifest["tasks"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DeploymentError(f"{where} is missing or mangles {exc}; re-export the folder") from None
    check_sizes(folder, files)
    runner.set_threads(threads)
    branch = runner.load(folder / br["program"], folder / BASE_DATA)
    merged, feeds = {}, {}
    for name, task in tasks.items():
        merged[name] = runner.load(folder / task["program"], folder / BASE_DATA)
        modules, head = read_delta(folder / task["delta"])
        feeds[name] = branch_feeds(modules, br["modules"], br["ranks"], head, br["labels"])
    return Programs(folder, manifest, branch, merged, feeds)


def calls(p: Programs, ids: np.ndarray, mask: np.ndarray) -> dict[str, dict[str, Callable[[], Any]]]:
    """task -> form -> one call of that program on ``ids``/``mask`` (converted once, outside the timing)."""
    import torch

    inputs = [torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(np.ascontiguousarray(mask))]
    return {name: {"merged": (lambda m=p.merged[name]: runner.call(m, inputs)),
                   "branches": (lambda f=p.feeds[name]: runner.call(p.branch, [*inputs, *f]))}
            for name in p.manifest["tasks"]}


def logits(p: Programs, name: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """form -> the task's logits (the branch program's cut to the task's labels)."""
    labels = int(p.manifest["tasks"][name]["labels"])
    return {"merged": runner.run(p.merged[name], [ids, mask]),
            "branches": runner.run(p.branch, [ids, mask, *p.feeds[name]])[..., :labels]}


def file_sizes(p: Programs) -> dict[str, Any]:
    size = {rel: int(e["size"]) for rel, e in p.manifest["files"].items()}
    return {"base_ptd": size[BASE_DATA], "branch_pte": size[p.manifest["branches"]["program"]],
            "tasks": {name: {"merged_pte": size[t["program"]], "delta": size[t["delta"]]}
                      for name, t in p.manifest["tasks"].items()}}


def export_parity(folder: Path) -> dict[str, dict[str, float]]:
    """task -> form -> max |Δ| against PEFT's merge_and_unload as the export measured it (report.json; the
    export's inputs, padded and not); empty where the report is gone."""
    try:
        rows = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))["tasks"]
        return {name: {"merged": float(r["max_abs_diff"]), "branches": float(r["branches"]["max_abs_diff"])}
                for name, r in rows.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def switch(p: Programs, runs: int) -> dict[str, float]:
    """Task switch medians: load a merged program over base.ptd; read a delta into the branch feeds."""
    br = p.manifest["branches"]
    tasks = {name: (t["program"], t["delta"]) for name, t in p.manifest["tasks"].items()}
    return switch_times(p.folder, tasks, br["modules"], br["ranks"], br["labels"], runs=runs)


def version() -> str:
    from importlib.metadata import version

    return version("executorch")


def _ms(value: float | None, ref: float | None) -> str:
    if value is None:
        return f"{'-':>10} {'-':>7}"
    return f"{value:8.2f}ms {value / ref:6.2f}x" if ref else f"{value:8.2f}ms {'-':>7}"


def _diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def table(result: dict[str, Any], cpu_line: str) -> str:
    """The bench result as text: per task one line per engine (latency, ratio to ONNX Runtime's fp32 engine
    where one was given, max |Δ| against PyTorch and ONNX Runtime, the task's own file), then switch times."""
    b, beside = result["bytes"], result.get("beside")
    lines = [f"{result['folder']}: {result['target']} (executorch {result['executorch']}), {result['shape']}, "
             f"{result['threads']} threads, interleaved runs, medians"
             + (f"; ONNX Runtime fp32 from {beside}" if beside else ""), cpu_line,
             f"shared base.ptd {b['base_ptd'] / 1e6:.2f} MB, branch program {b['branch_pte'] / 1e3:.0f} kB "
             "(every task reads them)", "",
             f"{'task':10} {'engine':24} {'median':>10} {'vs ORT':>7} {'max|Δ| torch':>12} {'max|Δ| export':>13} "
             f"{'max|Δ| ORT':>10} {'task file':>10}"]
    for name, r in result["tasks"].items():
        lat, size, d = r["latency_ms"], r["bytes"], r["max_abs_diff"]
        ort = lat.get("ort_fp32")
        cells = []
        if ort is not None:
            cells.append(("ORT fp32 baked engine", ort, None, None, None, size["ort_engine"]))
        cells += [("ET merged .pte", lat["et_merged"], d["vs_pytorch"].get("merged"), d["export"].get("merged"),
                   d["vs_ort"].get("merged"), size["et_merged_pte"]),
                  ("ET branches (A,B fed)", lat["et_branches"], d["vs_pytorch"].get("branches"),
                   d["export"].get("branches"), d["vs_ort"].get("branches"), size["et_delta"])]
        for engine, ms, torch_d, export_d, ort_d, nbytes in cells:
            lines.append(f"{name:10} {engine:24} {_ms(ms, ort)} {_diff(torch_d):>12} {_diff(export_d):>13} "
                         f"{_diff(ort_d):>10} {nbytes / 1e6:8.2f}MB")
        if ort is not None:
            lines.append(f"{'':10} {'(ORT delta file)':24} {'':>10} {'':>7} {'':>12} {'':>13} {'':>10} "
                         f"{size['ort_delta'] / 1e6:8.2f}MB")
    sw = result["switch_ms"]
    line = (f"task switch (median): ET load merged program over base.ptd {sw['et_load_merged_program']:.1f} ms; "
            f"ET feed the branch program a delta {sw['et_feed_branches']:.2f} ms")
    if sw.get("ort_runtime_activate") is not None:
        line += f"; ORT runtime activate {sw['ort_runtime_activate']:.2f} ms"
    if sw.get("ort_fresh_session") is not None:
        line += f"; ORT fresh session on a task engine {sw['ort_fresh_session']:.0f} ms"
    lines += ["", line]
    return "\n".join(lines)
