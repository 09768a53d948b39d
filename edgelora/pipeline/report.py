"""The build's report: every cell's numbers against its gates, written as ``report.json`` and ``report.md`` beside
the deployment folders, PNG charts in ``charts/``, and a compact table for the console.

A cell fails when a gate's bound is missed, when a gate needs a number the cell does not have (an accuracy gate
on a task without an eval set), when the export's own checks against PyTorch failed, or when the cell could not
be built. Every failure names the cell and its numbers. Accuracy and engine size are the numbers this build
re-derived on the assembled folder (``rederive.py``), or, for a folder published unchanged, by the build that
published it; a cell's record is read only where no folder is assembled (``--only``, ``--prepare``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..latency import cpu_info, cpu_line
from .cache import atomic_write_text
from .spec import GATES

MB = 1e6


def _gate_values(row: dict[str, Any], base_latency: float | None) -> dict[str, float | None]:
    acc, torch_acc = row.get("accuracy"), row.get("torch_accuracy")
    lat, size = row.get("latency_ms"), row.get("engine_size_bytes")
    return {
        "max_accuracy_drop": (torch_acc - acc) * 100 if acc is not None and torch_acc is not None else None,
        "min_accuracy": acc,
        "max_latency_ratio": lat / base_latency if lat and base_latency else None,
        "max_engine_mb": size / MB if size is not None else None,
    }


def _check(gates: dict[str, float], values: dict[str, float | None]) -> tuple[dict[str, Any], list[str]]:
    out, missed = {}, []
    for name, bound in gates.items():
        if name not in values:
            continue
        value = values[name]
        ok = value is not None and (value >= bound if name.startswith("min_") else value <= bound)
        out[name] = {"value": value, "bound": bound, "ok": ok}
        if value is None:
            missed.append(f"{name} needs a number the cell does not have ({GATES[name]}; add an eval set)")
        elif not ok:
            missed.append(f"{name.replace('_', ' ')} {value:.4g} vs bound {bound:g}")
    return out, missed


# complexity: one pass over the build's cells that gathers each kind's numbers, a branch per kind and state
def collect(b: Any) -> dict[str, Any]:  # noqa: C901
    from ..export.stages import base_state, task_state

    errors = [{"cell": f"{c.kind} {c.name}", "error": c.error, "exit_code": c.exit_code} for c in b.cells if c.error]
    failures = [f"{e['cell']}: {e['error']}" for e in errors]
    targets: dict[str, Any] = {}
    for ref in b.targets_to_build():
        label = b.labels[ref]
        cell = next((c for c in b.cells if c.kind == "base" and c.name == label), None)
        if cell is None or cell.error:
            continue
        state = base_state(b.cache.path("base", cell.key))
        targets[label] = {"base_latency_ms": state["latency_ms"], "base_failures": state["failures"],
                          "folder": None, "bundle_mb": None}
        failures += [f"{label} base: {f}" for f in state["failures"]]
    rows = []
    for cell in (c for c in b.cells if c.kind == "task"):
        task, label = cell.name.split("/", 1)
        row: dict[str, Any] = {"task": task, "target": label, "built": cell.built, "seconds": cell.seconds}
        if cell.error:
            rows.append({**row, "error": cell.error})
            continue
        state = task_state(b.cache.path("task", cell.key))
        fresh = b.rederived.get(label, {}).get("tasks", {}).get(task)
        r = {**state["report"], **(fresh or {})}
        row["numbers"] = "re-derived" if fresh is not None else "cell record"
        row |= {k: r.get(k) for k in ("accuracy", "torch_accuracy", "latency_ms", "engine_size_bytes",
                                      "task_bytes", "delta_size_bytes", "bake", "max_abs_diff", "cosine")}
        values = _gate_values(r, targets.get(label, {}).get("base_latency_ms"))
        row["latency_ratio"] = values["max_latency_ratio"]
        row["gates"], missed = _check(b.p.tasks[task].gates, values)
        missed += state["failures"]
        row["ok"] = not missed
        failures += [f"{cell.name}: {m}" for m in missed]
        rows.append(row)
    for cell in (c for c in b.cells if c.kind == "folder" and not c.error):
        folder = Path(cell.job["output"])
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        bundle = report["device_bundle"]["bytes"] / MB
        t = targets[cell.name]
        t |= {"folder": str(folder), "bundle_mb": bundle, "assembled": cell.built,
              "assembled_because": cell.job["why"] if cell.built else None,
              "runtime_failures": [f for f in report["failures"] if "runtime" in f]}
        failures += [f"{cell.name} folder: {f}" for f in t["runtime_failures"]]
        failures += [f"{cell.name} folder: {m}" for m in (b.rederived.get(cell.name) or {}).get("misses", [])]
        bound = b.p.gates.get("max_bundle_mb")
        if bound is not None and bundle > bound:
            failures.append(f"{cell.name} bundle: {bundle:.1f} MB vs bound max_bundle_mb {bound:g}")
    train = {c.name: {"built": c.built, "seconds": c.seconds, "error": c.error} for c in b.cells if c.kind == "train"}
    for name, t in train.items():
        if not t["error"]:
            rec = b.cache.record("train", b.train_key(name))
            t |= {"train_seconds": rec.get("seconds"), "history": rec.get("history")}
    built = {k: sum(1 for c in b.cells if c.kind == k and c.built) for k in ("train", "base", "task", "folder")}
    cached = {k: sum(1 for c in b.cells if c.kind == k and not c.built and not c.error)
              for k in ("train", "base", "task", "folder")}
    return {"pipeline": str(b.p.source), "executor": b.executor_kind, "jobs": b.jobs, "threads": b.p.threads,
            "machine": cpu_info(), "cells": rows, "targets": targets, "train": train,
            "built": built, "cached": cached, "errors": errors, "failures": failures, "cache": b.cache_notes,
            "cache_signed": b.secret is not None}


def write_report(b: Any) -> dict[str, Any]:
    import time

    report = collect(b)
    out = b.p.output
    previous = _previous(out)
    report["changed"] = _changes(report, previous)
    report["wall_seconds"] = round(time.perf_counter() - b.started, 2)
    if b.only is None and not b.prepare:
        _write_files(report, out)
    return report


def _write_files(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md and the charts; a disk's refusal is one line naming the folder (the deployment
    folders are already published by then), and leaves no half-written file."""
    import contextlib
    import os

    from ..errors import EdgeloraError
    from ..fsutil import disk_error, mark_output

    try:
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
        atomic_write_text(out / "report.md", markdown(report))
        report["charts"] = charts(report, out / "charts")
    except OSError as exc:
        for name in ("report.json", "report.md"):  # atomic_write_text's, if it was cut short
            with contextlib.suppress(OSError):
                (out / f".{name}.{os.getpid()}.tmp").unlink()
        raise disk_error(exc, out, out) or EdgeloraError(
            f"cannot write the build report in {out} ({exc.strerror or exc}); the deployment folders were "
            "written; make the output folder writable and build again (cached cells are reused)") from None


def _previous(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _changes(report: dict[str, Any], previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per cell: rebuilt or not, and how its accuracy, latency and size moved since the previous build."""
    before = {(r["task"], r["target"]): r for r in (previous or {}).get("cells", [])}
    out = []
    for r in report["cells"]:
        p = before.get((r["task"], r["target"]), {})
        out.append({"cell": f"{r['task']}/{r['target']}", "rebuilt": r["built"], "new": not p,
                    **{f"{k}_change": (r[k] - p[k]) if r.get(k) is not None and p.get(k) is not None else None
                       for k in ("accuracy", "latency_ms", "engine_size_bytes")}})
    return out


def _pct(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "–"


def _num(v: Any, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def table(report: dict[str, Any]) -> str:
    """The console table: one line per cell."""
    head = f"{'cell':<28} {'acc':>7} {'torch':>7} {'drop':>6} {'ms':>7} {'×base':>6} {'MB':>6} {'task KB':>8}  state"
    lines = [cpu_line(), head]
    for r in report["cells"]:
        state = "ERROR" if r.get("error") else ("ok" if r.get("ok") else "FAIL")
        drop = (r["torch_accuracy"] - r["accuracy"]) * 100 if r.get("accuracy") is not None else None
        size = r.get("engine_size_bytes")
        lines.append(f"{r['task'] + '/' + r['target']:<28} {_pct(r.get('accuracy')):>7} "
                     f"{_pct(r.get('torch_accuracy')):>7} {_num(drop):>6} {_num(r.get('latency_ms')):>7} "
                     f"{_num(r.get('latency_ratio')):>6} {_num(size / MB if size else None, '.1f'):>6} "
                     f"{_num((r.get('task_bytes') or 0) / 1e3, '.0f'):>8}  {state}"
                     + (" (cached)" if not r["built"] and not r.get("error") else ""))
    for label, t in report["targets"].items():
        why = f" (assembled: {t['assembled_because']})" if t.get("assembled_because") else ""
        lines.append(f"{label}: base engine {_num(t['base_latency_ms'])} ms, device bundle "
                     f"{_num(t.get('bundle_mb'), '.1f')} MB, folder {t.get('folder') or '–'}{why}")
    b, c = report["built"], report["cached"]
    lines.append("cells built: " + ", ".join(f"{k} {b[k]}" for k in b) + " · from the cache: "
                 + ", ".join(f"{k} {c[k]}" for k in c) + f" · wall {report['wall_seconds']:.1f} s")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# edgelora build report", "", f"Pipeline `{report['pipeline']}` · executor {report['executor']} "
             f"({report['jobs']} jobs, {report['threads']} threads per cell) · wall {report['wall_seconds']:.1f} s",
             "", f"Machine: {report['machine'].get('model', '?')}; flags: "
             f"{' '.join(report['machine'].get('flags', []))}", ""]
    lines += ["**Result: " + ("every gate holds**" if not report["failures"] else
                               f"{len(report['failures'])} failure(s)**"), ""]
    lines += [f"- {f}" for f in report["failures"]] + ([""] if report["failures"] else [])
    lines += [f"- {n}" for n in report.get("cache", [])] + ([""] if report.get("cache") else [])
    if report.get("charts"):
        lines += [f"![{Path(c).stem}](charts/{Path(c).name})" for c in report["charts"]] + [""]
    lines += ["| task | target | accuracy | PyTorch | drop (pts) | latency ms | × base | engine MB | task KB | bake |"
              " gates | cell |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cells"]:
        if r.get("error"):
            lines.append(f"| {r['task']} | {r['target']} | | | | | | | | | error: {r['error']} | |")
            continue
        drop = (r["torch_accuracy"] - r["accuracy"]) * 100 if r.get("accuracy") is not None else None
        gates = ", ".join(f"{'✅' if g['ok'] else '❌'} {k}" for k, g in r["gates"].items()) or "–"
        lines.append(f"| {r['task']} | {r['target']} | {_pct(r.get('accuracy'))} | {_pct(r.get('torch_accuracy'))} "
                     f"| {_num(drop)} | {_num(r.get('latency_ms'))} | {_num(r.get('latency_ratio'))} | "
                     f"{_num((r.get('engine_size_bytes') or 0) / MB, '.1f')} | "
                     f"{_num((r.get('task_bytes') or 0) / 1e3, '.0f')} | {r.get('bake') or '–'} | {gates} | "
                     f"{'built' if r['built'] else 'cached'} |")
    lines += ["", "| target | base engine ms | device bundle MB | folder |", "|---|---|---|---|"]
    for label, t in report["targets"].items():
        lines.append(f"| {label} | {_num(t['base_latency_ms'])} | {_num(t.get('bundle_mb'), '.1f')} | "
                     f"`{t.get('folder') or '–'}` |")
    changed = [c for c in report.get("changed", []) if c["rebuilt"]]
    lines += ["", f"Changed since the previous build: {len(changed)} cell(s) rebuilt"
              + (": " + ", ".join(c["cell"] for c in changed) if changed else "")]
    return "\n".join(lines) + "\n"


def charts(report: dict[str, Any], folder: Path) -> list[str]:
    """accuracy / latency / size per task × target, accuracy vs size per target, what changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in report["cells"] if not r.get("error")]
    if not rows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    cell = {(r["task"], r["target"]): r for r in rows}
    written = []

    def bars(name: str, key: str, scale: float, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(max(6, len(tasks) * 0.9), 3.6))
        width = 0.8 / len(targets)
        x = np.arange(len(tasks))
        for i, g in enumerate(targets):
            vals = [(cell.get((t, g), {}).get(key) or 0) * scale for t in tasks]
            ax.bar(x + i * width, vals, width, label=g)
        ax.set_xticks(x + width * (len(targets) - 1) / 2, tasks, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(str(folder / name))

    bars("accuracy.png", "accuracy", 100, "accuracy on the eval set, %")
    bars("latency.png", "latency_ms", 1, "engine latency, ms (median)")
    bars("engine_size.png", "engine_size_bytes", 1 / MB, "task engine, MB read")
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in targets:
        pts = [(cell[(t, g)].get("task_bytes") or 0, cell[(t, g)].get("accuracy")) for t in tasks if (t, g) in cell]
        pts = [(s / 1e3, a * 100) for s, a in pts if a is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=g)
    ax.set_xlabel("what a task adds to the folder, KB")
    ax.set_ylabel("accuracy, %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_size.png", dpi=110)
    plt.close(fig)
    written.append(str(folder / "accuracy_vs_size.png"))
    changes = report.get("changed", [])
    fig, ax = plt.subplots(figsize=(max(6, len(changes) * 0.45), 3.6))
    deltas = [(c["accuracy_change"] or 0) * 100 for c in changes]
    colors = ["tab:orange" if c["rebuilt"] else "tab:gray" for c in changes]
    ax.bar(range(len(changes)), deltas, color=colors, width=0.6)
    ax.scatter(range(len(changes)), deltas, c=colors, s=60, zorder=3)  # visible when nothing moved
    ax.axhline(0, color="black", linewidth=0.6)
    for i, c in enumerate(changes):
        ax.annotate("new" if c["new"] else ("rebuilt" if c["rebuilt"] else "cached"), (i, deltas[i]),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=6)
    ax.set_xticks(range(len(changes)), [c["cell"] for c in changes], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy change, points")
    rebuilt = sum(1 for c in changes if c["rebuilt"])
    ax.set_title(f"since the previous build: {rebuilt}/{len(changes)} cells rebuilt (orange), grey: cached",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "changes.png", dpi=110)
    plt.close(fig)
    written.append(str(folder / "changes.png"))
    return written
