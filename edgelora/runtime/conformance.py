"""``Runtime.self_test``: the folder's reference vectors re-run on the machine that holds it.

A folder is proven where it runs, not only where it was built: int8 kernels differ between CPUs (AVX2 without
VNNI can saturate u8·s8 sums), a phone's ARM kernels differ again, and engine data can change after export
while its manifest hashes are rewritten to match. So each check here compares what THIS machine computes with
what PyTorch computed at export (``conformance.safetensors``), under the target's tolerances:

- ``reference (MODE)``: the task activated in the runtime's mode (swap, LoRA branches, baked engine), its
  reference inputs run, the outputs vs PyTorch's: max |Δ|, cosine, argmax agreement (the last two only where
  they mean something: cosine for hidden states, all three for logits);
- ``baked engine``: the same on the task's baked engine, where the folder carries one;
- ``changes the outputs``: the task's outputs are nearer PyTorch's than to the base's (with the task's head, on
  this machine and in PyTorch) and to each other task's, so a delta replaced by zeros, or by another task's,
  fails. Where PyTorch's own LoRA effect on these inputs is within twice this machine's error on the base (a
  barely trained adapter on an int8 target) nothing can tell them apart: the check says so and passes;
- ``A→B→A``: activate A, run, activate B and run, rebuild A (no slot reused) and run: bit-identical to the
  first run (a swap rebuilds ``W0 + s·B·A`` from W0, never by subtracting).

Imports numpy only, like the rest of the runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DeploymentError
from ..format.conformance import Reference, parse_references
from ..format.files import read_bytes
from ..format.manifest import ConformanceTolerance


@dataclass(frozen=True)
class Check:
    """One check's outcome: which task, what was checked, what was measured and the bound it was held to."""

    task: str
    check: str
    ok: bool
    measured: str
    bound: str = ""

    def line(self) -> str:
        return f"{'pass' if self.ok else 'FAIL'}  {self.task}: {self.check}: {self.measured}" + (
            f" (bound {self.bound})" if self.bound and self.bound != self.measured else "")


@dataclass(frozen=True)
class SelfTest:
    """Every check of one self test and how long it took. ``unavailable``: why there was nothing to run (a folder
    without reference vectors), else None."""

    checks: tuple[Check, ...]
    seconds: float
    unavailable: str | None = None
    mode: str = ""
    failures: tuple[Check, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.unavailable is None and not self.failures

    def summary(self) -> str:
        """One line: all passed (and the time), the first failure with its numbers, or why nothing ran."""
        if self.unavailable is not None:
            return f"conformance: not run: {self.unavailable}"
        if self.failures:
            f = self.failures[0]
            more = f" (and {len(self.failures) - 1} more failed check(s))" if len(self.failures) > 1 else ""
            return (f"conformance failed: {f.task}: {f.check}: {f.measured}"
                    + (f" vs bound {f.bound}" if f.bound else "") + more)
        return f"conformance: {len(self.checks)} checks passed in {self.seconds:.2f} s"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "mode": self.mode, "unavailable": self.unavailable,
                "checks": [{"task": c.task, "check": c.check, "ok": c.ok, "measured": c.measured, "bound": c.bound}
                           for c in self.checks]}


def metrics(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(max |Δ|, cosine over the whole tensor, argmax agreement over the last axis) in float64."""
    e, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = float(np.linalg.norm(e) * np.linalg.norm(r))
    cosine = float(e @ r / denom) if denom > 0 else (1.0 if np.array_equal(e, r) else 0.0)
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    return (float(np.max(np.abs(e - r))) if e.size else 0.0), cosine, agree


def compare(task: str, check: str, got: Mapping[str, np.ndarray], ref: Reference,
            tol: ConformanceTolerance) -> Check:
    """``got`` (the runtime's outputs) vs ``ref`` under ``tol``: every output of the reference; logits held to all
    three bounds, hidden states to the cosine (an argmax over hidden units, and their scale, are the model's)."""
    measured, misses, bounds = [], [], []
    for name, expected in ref.outputs.items():
        out = got.get(name)
        if out is None:
            return Check(task, check, False, f"no output {name!r} (outputs: {', '.join(sorted(got))})")
        if ref.positions == "last" and out.ndim == expected.ndim + 1:
            out = out[:, -1]
        if out.shape != expected.shape:
            return Check(task, check, False, f"{name} has shape {list(out.shape)}, the reference "
                                             f"{list(expected.shape)}")
        diff, cosine, agree = metrics(out, expected)
        logits = name == "logits"
        tag = "" if len(ref.outputs) == 1 else f"{name} "
        measured.append(f"{tag}max |Δ| {diff:.3g}, cosine {cosine:.6f}" + (f", agreement {agree:.3f}" if logits
                                                                            else ""))
        if logits:
            bounds.append(f"max |Δ| ≤ {tol.max_abs_diff:g}, cosine ≥ {tol.min_cosine:g}, agreement ≥ "
                          f"{tol.min_agreement:g}")
            if not diff <= tol.max_abs_diff:
                misses.append(f"{tag}max |Δ| {diff:.3g} > {tol.max_abs_diff:g}")
            if not agree >= tol.min_agreement:
                misses.append(f"{tag}agreement {agree:.3f} < {tol.min_agreement:g}")
        else:
            bounds.append(f"{tag}cosine ≥ {tol.min_cosine:g}")
        if not cosine >= tol.min_cosine:
            misses.append(f"{tag}cosine {cosine:.6f} < {tol.min_cosine:g}")
    if misses:
        return Check(task, check, False, "; ".join(misses), "; ".join(bounds))
    return Check(task, check, True, "; ".join(measured), "; ".join(bounds))


def _distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], keys: list[str]) -> float:
    """Euclidean distance over the outputs both hold (inf where shapes differ: nothing to confuse)."""
    total = 0.0
    for k in keys:
        if k not in a or k not in b or a[k].shape != b[k].shape:
            return float("inf")
        total += float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2))
    return total ** 0.5


class Runner:
    """What the self test needs of a Runtime (kept here so runtime.py stays the API): run a task on its inputs in
    the runtime's mode, run the base with a task's head, run a task's baked engine, rebuild a task."""

    def __init__(self, run: Callable[[str | None, Reference], dict[str, np.ndarray]],
                 base_with_head: Callable[[str, Reference], dict[str, np.ndarray]],
                 baked: Callable[[str, Reference], dict[str, np.ndarray] | None],
                 activate: Callable[[str | None], None], forget: Callable[[], None]) -> None:
        self.run, self.base_with_head, self.baked, self.activate, self.forget = run, base_with_head, baked, \
            activate, forget


def load_references(folder: Any, manifest: Any) -> dict[str, Reference] | str:
    """The folder's reference vectors, or why it has none (one line)."""
    spec = manifest.conformance
    if spec is None:
        why = manifest.conformance_unavailable or "exported before reference vectors were written"
        return f"{folder} has no reference vectors ({why}); re-export it with this edgelora to check it on this device"
    where = str(folder / spec.file)
    data = read_bytes(folder, spec.file, "conformance file", manifest.files[spec.file])
    refs = parse_references(data, spec, where)
    missing = sorted(set(manifest.tasks) - set(refs))
    if missing:
        raise DeploymentError(f"{where}: task {missing[0]!r} has no reference vectors; re-export the folder")
    return refs


def self_test(runner: Runner, refs: Mapping[str, Reference], tol: ConformanceTolerance, mode: str,
              baked: bool = True) -> list[Check]:
    """Every check over ``refs`` (task -> its reference vectors), in order; see the module docstring."""
    checks: list[Check] = []
    outs: dict[str, dict[str, np.ndarray]] = {}
    for task, ref in refs.items():
        runner.activate(task)
        outs[task] = _last(runner.run(task, ref), ref)
        checks.append(compare(task, f"reference ({mode})", outs[task], ref, tol))
        if baked:
            got = runner.baked(task, ref)
            if got is not None:
                checks.append(compare(task, "baked engine", got, ref, tol))
    for task, ref in refs.items():
        checks.append(_changes(runner, task, ref, outs[task], refs))
    checks.append(_aba(runner, refs))
    return checks


def _changes(runner: Runner, task: str, ref: Reference, out: dict[str, np.ndarray],
             refs: Mapping[str, Reference]) -> Check:
    """The task's outputs nearer PyTorch's than the base's (here and in PyTorch) and every other task's."""
    keys = list(ref.outputs)
    base = _last(runner.base_with_head(task, ref), ref)
    effect = _distance(ref.outputs, ref.without, keys)  # how far the LoRA moves these outputs in PyTorch
    noise = _distance(base, ref.without, keys)  # this machine's error on them without the LoRA
    if not effect > 2 * noise:
        return Check(task, "changes the outputs", True, f"PyTorch's LoRA effect {effect:.3g} is within twice this "
                     f"machine's error without it ({noise:.3g}): too small to tell here")
    others = {"the base": base, "PyTorch's base": ref.without}
    for other in refs:  # another task on these inputs (same shape of output: the same kind of head)
        if other != task:
            runner.activate(other)
            others[f"task {other}"] = _last(runner.run(other, ref), ref)
    to_ref = _distance(out, ref.outputs, keys)
    near, dist = min(((who, _distance(out, o, keys)) for who, o in others.items()), key=lambda x: x[1])
    return Check(task, "changes the outputs", to_ref < dist, f"|out − PyTorch| {to_ref:.3g}, |out − {near}| "
                 f"{dist:.3g} (LoRA effect in PyTorch {effect:.3g})",
                 "nearer PyTorch's outputs than the base's and every other task's")


def _aba(runner: Runner, refs: Mapping[str, Reference]) -> Check:
    """A→B→A: the first task's outputs, bit for bit, after another task (or the base) and a rebuild of A."""
    names = list(refs)
    a, b = names[0], (names[1] if len(names) > 1 else None)
    ref = refs[a]
    runner.activate(a)
    first = runner.run(a, ref)
    runner.activate(b)
    runner.run(b, refs[b] if b is not None else ref)
    runner.forget()  # A's weights are rebuilt from W0 + s·B·A, not found in a slot
    runner.activate(a)
    again = runner.run(a, ref)
    label = f"A→B→A ({a}→{b or 'base'}→{a})"
    bad = [k for k in first if k not in again or not np.array_equal(first[k], again[k])]
    if bad:
        diff = max(float(np.max(np.abs(first[k].astype(np.float64) - again[k]))) if k in again else float("inf")
                   for k in bad)
        return Check(a, label, False, f"{bad[0]} differs after switching back: max |Δ| {diff:.3g}", "bit-identical")
    return Check(a, label, True, "bit-identical", "bit-identical")


def _last(out: dict[str, np.ndarray], ref: Reference) -> dict[str, np.ndarray]:
    """The outputs at the positions the reference holds (a decoder's last position)."""
    if ref.positions != "last":
        return out
    return {k: (v[:, -1] if v.ndim == ref.outputs[k].ndim + 1 else v) if k in ref.outputs else v
            for k, v in out.items()}


def run_self_test(runner: Runner, refs: Mapping[str, Reference], tol: ConformanceTolerance, mode: str,
                  started: float) -> SelfTest:
    checks = tuple(self_test(runner, refs, tol, mode))
    return SelfTest(checks, time.perf_counter() - started, None, mode, tuple(c for c in checks if not c.ok))
