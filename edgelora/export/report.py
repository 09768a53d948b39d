"""The export report: what every engine measured, as a table (CLI), markdown (report.md) and JSON."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def engine_size(path: Path) -> int:
    """Bytes an engine needs: its file plus the bytes of every weight it reads from external data files (engines
    of one folder share those files, so this counts what it takes to run it alone, not what it adds to the
    folder). Any other file: its size."""
    total = path.stat().st_size
    if path.suffix != ".onnx":
        return total
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if "location" in info:
            total += int(info["length"]) if "length" in info else (path.parent / info["location"]).stat().st_size
    return total


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report_rows(report: Mapping[str, Any]) -> list[list[str]]:
    b = report["base"]
    rows = [["engine", "accuracy (torch)", "max |Δ|", "cosine", "agreement", "latency", "engine size", "task adds"],
            ["base", "-", _fmt(b.get("max_abs_diff"), ".2e"), _fmt(b.get("cosine"), ".6f"),
             _fmt(b.get("agreement"), ".3f"), f"{b['latency_ms']:.2f} ms", _mb(b["size_bytes"]), "-"]]
    for name, t in report["tasks"].items():
        acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.2%} ({t['torch_accuracy']:.2%})"
        rows.append([name, acc, _fmt(t["max_abs_diff"], ".2e"), _fmt(t["cosine"], ".6f"),
                     _fmt(t["agreement"], ".3f"), "-" if t["latency_ms"] is None else f"{t['latency_ms']:.2f} ms",
                     _mb(t["engine_size_bytes"]), _mb(t.get("task_bytes", t["delta_size_bytes"]))])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def report_markdown(report: Mapping[str, Any]) -> str:
    rows = report_rows(report)
    lines = [f"# edgelora export report: {report['target']} ({report['precision']})", "",
             f"Base fingerprint `{report['base']['fingerprint']}`. Latency: median after warm-up, "
             f"{report['machine']['threads']} threads. Export took {report['export_seconds']} s.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    baked = {name: t["bake"] for name, t in report["tasks"].items() if t.get("bake")}
    if baked:
        lines += ["", "Task engines: " + "; ".join(f"{name} {how}" for name, how in baked.items()) + "."]
    if report["base"].get("unfused_latency_ms"):
        lines += ["", f"Unfused fp32 base engine: {report['base']['unfused_latency_ms']:.2f} ms "
                      f"(fusion gain {report['base']['unfused_latency_ms'] / report['base']['latency_ms']:.2f}x)."]
    return "\n".join(lines) + "\n"
