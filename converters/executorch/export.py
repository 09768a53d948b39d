"""``edgelora export --target executorch-xnnpack``: the steps, over the export's context, that replace the ONNX
steps after the adapters are read and checked (``edgelora/export/steps.py`` runs them the same way).

1. :func:`check_request`   the task kind and adapters this backend can lower (one-line refusals)
2. :func:`build_programs`  the branch program + ``base.ptd`` (shared), per task its merged ``.pte`` and delta
3. :func:`verify`          every program through ExecuTorch's Python runtime vs PEFT's merged model in PyTorch
4. :func:`measure`         latency of both forms (interleaved), task switch time of both
5. :func:`write_outputs`   tokenizer, manifest (sizes + sha256 of every file), report.json / report.md

Folder::

    base.ptd                      the base weights, shared by every program (XNNPACK's by content hash, the
                                  portable kernels' by name)
    lora.pte                      the branch program: A, B and the head are inputs (every task runs it)
    tasks/NAME/merged.pte         the task's merged program: only its merged LoRA targets and head inline
    tasks/NAME/delta.safetensors  the task's A, B, scales and head (what the branch program is fed)
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelora.errors import EdgeloraError
from edgelora.format.delta import read_delta, write_delta
from edgelora.format.files import file_table
from edgelora.format.layout import REPORT_JSON, REPORT_MD, TOKENIZER_DIR, adapter_record, delta_path, write_json
from edgelora.lora import LAYOUTS, DeltaModule

from . import program, runner
from .layout import BASE_DATA, BRANCH_PROGRAM, FORMAT, FORMAT_VERSION, MANIFEST, merged_program_path

__all__ = ["BASE_DATA", "BRANCH_PROGRAM", "FORMAT", "FORMAT_VERSION", "MANIFEST", "STEPS", "State", "TaskState",
           "branch_feeds", "merged_program_path", "switch_times"]

SWITCHES = 6  # timed loads / feeds per switch measurement


# ------------------------------------------------------------------------------------------------ the state
@dataclass
class TaskState:
    """One task as the steps build it: its files, its loaded merged program and branch feeds, its numbers."""

    labels: int  # the task's own label count (the branch program's logits are cut to it)
    program: str  # tasks/NAME/merged.pte, inside the folder
    delta: str  # tasks/NAME/delta.safetensors
    method: Any = None  # the merged program's loaded forward (verify)
    feeds: list[torch.Tensor] = field(default_factory=list)  # the branch program's extra inputs (verify)
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # form -> worst parity vs PEFT
    latency_ms: dict[str, float] = field(default_factory=dict)  # form -> median ms


@dataclass
class State:
    """What this backend's steps build (``ctx.backend.state``; the context's ``base_result`` and ``tasks`` are
    the ONNX steps' and stay empty here)."""

    order: list[str]  # the branch program's LoRA modules, in feed order
    ranks: dict[str, int]  # module -> the program's rank (the most any task has)
    labels: int  # the branch program's label count (the most any task has)
    head: str  # the head module fed as inputs
    branch: Any = None  # the branch program's loaded forward (verify)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    switch: dict[str, float] = field(default_factory=dict)  # task switch medians (measure)


def state(ctx: Any) -> State:
    """The export's state, owned by its backend instance (one per export)."""
    st = getattr(ctx.backend, "state", None)
    if not isinstance(st, State):
        raise RuntimeError("the executorch steps run in order: build_programs first")
    return st


# ------------------------------------------------------------------------------------------------ 1. the request
def check_request(ctx: Any) -> None:
    where = f"target {ctx.target.name}"
    if ctx.task != "sequence-classification":
        raise EdgeloraError(f"{where} exports sequence-classification adapters only (these are {ctx.task}); "
                            "use a cpu-* target for them")
    if ctx.evals:
        raise EdgeloraError(f"{where}: --eval is not supported by the ExecuTorch backend yet; export without it "
                            "(parity against PyTorch is checked on every program)")
    for name, prep in ctx.prepared.items():
        for t in prep.plan.targets:
            if t.lora.magnitude is not None or t.lora.bias is not None or t.lora.kind != "linear" \
                    or t.fan_in_fan_out:
                raise EdgeloraError(f"adapter {name}: {t.module} is not a plain LoRA on a Linear (DoRA, LoRA bias, "
                                    f"embedding or fan_in_fan_out); {where} cannot run it as a branch, use cpu-fp32")
        heads = {k.rpartition(".")[0] for k in prep.plan.replacements}
        if len(heads) != 1 or set(prep.plan.replacements) != {f"{h}.{p}" for h in heads for p in ("weight", "bias")}:
            raise EdgeloraError(f"adapter {name}: modules_to_save gives {sorted(prep.plan.replacements)}; "
                                f"{where} needs exactly one Linear head (weight and bias)")
    if len({next(iter(p.plan.replacements)).rpartition(".")[0] for p in ctx.prepared.values()}) != 1:
        raise EdgeloraError(f"the adapters train different head modules; {where} needs one head module for all")
    poolings = {name: p.head.pooling for name, p in ctx.prepared.items()}
    if len(set(poolings.values())) != 1:
        listed = ", ".join(f"{n}: {v}" for n, v in poolings.items())
        raise EdgeloraError(f"the adapters' heads read different poolings ({listed}); {where} runs every task on "
                            "one branch program, so export the cls and mean tasks separately")
    if len({tuple(sorted(t.module for t in p.plan.targets)) for p in ctx.prepared.values()}) != 1:
        raise EdgeloraError(f"the adapters target different modules; {where} runs every task on one branch "
                            "program, so give them the same target_modules")


# ------------------------------------------------------------------------------------------------ 2. the programs
def _inputs(ctx: Any, half_padded: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Seeded token ids avoiding the special tokens (as ``edgelora.verify.fixed_inputs``); optionally the
    second half of every row masked out."""
    batch, seq = ctx.target.shapes.batch, ctx.target.shapes.sequence
    vocab = int(ctx.model_config.vocab_size)
    ids = np.random.default_rng(seed).integers(min(1000, vocab // 2), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if half_padded:
        mask[:, seq // 2:] = 0
    return [ids, mask]


def _modules(prep: Any) -> dict[str, DeltaModule]:
    return {t.module: DeltaModule(t.module, t.lora.A.detach().float().numpy(), t.lora.B.detach().float().numpy(),
                                  float(t.lora.scale)) for t in prep.plan.targets}


def _head(prep: Any) -> tuple[str, dict[str, np.ndarray]]:
    name = next(iter(prep.plan.replacements)).rpartition(".")[0]
    return name, {p: prep.plan.replacements[f"{name}.{p}"].detach().float().numpy() for p in ("weight", "bias")}


def branch_feeds(modules: dict[str, DeltaModule], order: list[str], ranks: dict[str, int],
                 head: dict[str, np.ndarray], labels: int) -> list[torch.Tensor]:
    """The branch program's extra inputs for one task: per module Aᵀ (in, r) and (s·B)ᵀ (r, out), zero-padded to
    the program's rank (zero rows add nothing), then the head's weightᵀ (in, labels) and bias, zero-padded to
    the program's label count (the extra logits are cut off)."""
    feeds = []
    for name in order:
        m, r = modules[name], ranks[name]
        a_t = np.zeros((m.A.shape[1], r), np.float32)
        a_t[:, :m.A.shape[0]] = m.A.T
        sb_t = np.zeros((r, m.B.shape[0]), np.float32)
        sb_t[:m.B.shape[1]] = (m.B * np.float32(m.scale)).T
        feeds += [torch.from_numpy(a_t), torch.from_numpy(sb_t)]
    w_t = np.zeros((head["weight"].shape[1], labels), np.float32)
    w_t[:, :head["weight"].shape[0]] = head["weight"].T
    bias = np.zeros(labels, np.float32)
    bias[:head["bias"].shape[0]] = head["bias"]
    return [*feeds, torch.from_numpy(w_t), torch.from_numpy(bias)]


def build_programs(ctx: Any) -> None:
    first = next(iter(ctx.prepared.values()))
    order = sorted(t.module for t in first.plan.targets)
    ranks = {m: max(int(t.lora.A.shape[0]) for p in ctx.prepared.values() for t in p.plan.targets if t.module == m)
             for m in order}
    head_name, _ = _head(first)
    labels = max(int(p.plan.replacements[f"{head_name}.weight"].shape[0]) for p in ctx.prepared.values())
    example = [torch.from_numpy(x) for x in _inputs(ctx)]
    ctx.step("lowering the branch program (base weights -> base.ptd)")
    branches = program.Branches(copy.deepcopy(first.model), order, head_name).eval()  # W0 everywhere
    feeds = branch_feeds(_modules(first), order, ranks, _head(first)[1], labels)
    lowered = program.lower(branches, [*example, *feeds], shared=set(branches.state_dict()))
    program.write(lowered, ctx.out, BRANCH_PROGRAM.removesuffix(".pte"), data=True)
    if not (ctx.out / BASE_DATA).is_file():
        raise EdgeloraError(f"executorch wrote no {BASE_DATA} for the branch program; this executorch cannot keep "
                            "weights outside the program (needs executorch ≥ 1.5)")
    st = ctx.backend.state = State(order, ranks, labels, head_name)
    for name, prep in ctx.prepared.items():
        ctx.step(f"lowering the merged program of {name}")
        merged = copy.deepcopy(prep.model)
        state = merged.state_dict()
        own = set()
        with torch.no_grad():
            for t in prep.plan.targets:  # W0 + s·B·A in fp32, (out, in) as torch.nn.Linear stores it
                w0 = state[t.weight_key].float().numpy()
                dw = LAYOUTS["out_in"](t.lora.A.float().numpy(), t.lora.B.float().numpy(), float(t.lora.scale))
                state[t.weight_key].copy_(torch.from_numpy(w0 + dw))
                own.add(f"m.{t.weight_key}")
            for key, value in prep.plan.replacements.items():
                state[key].copy_(value.float())
                own.add(f"m.{key}")
        wrapped = program.Logits(merged).eval()
        lowered = program.lower(wrapped, example, shared=set(wrapped.state_dict()) - own)
        path = ctx.out / merged_program_path(name)
        program.write(lowered, path.parent, path.stem, data=False)  # its base.ptd is the shared one
        head = _head(prep)[1]
        task_labels = prep.head.labels if prep.head.labels else None
        write_delta(ctx.out / delta_path(name), _modules(prep), head, ctx.base_fingerprint,
                    list(task_labels) if task_labels else None, prep.head.pooling)
        st.tasks[name] = TaskState(int(head["weight"].shape[0]), merged_program_path(name), delta_path(name))


# ------------------------------------------------------------------------------------------------ 3. parity
def _reference(ctx: Any, name: str, inputs: list[np.ndarray]) -> np.ndarray:
    """PEFT's own merge (``merge_and_unload``) of the adapter folder on a fresh copy of the base, in PyTorch."""
    from peft import PeftModel

    base = copy.deepcopy(ctx.prepared[name].model)
    model = PeftModel.from_pretrained(base, str(ctx.adapters[name])).merge_and_unload().eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(inputs[0]), attention_mask=torch.from_numpy(inputs[1])).logits.numpy()


def _parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    return {"max_abs_diff": float(np.max(np.abs(g - r))),
            "cosine": float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r)),
            "agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def _worst(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"]), "cosine": min(a["cosine"], b["cosine"]),
            "agreement": min(a["agreement"], b["agreement"])}


def _misses(p: dict[str, float], tol: Any) -> list[str]:
    out = []
    if not p["max_abs_diff"] <= tol.max_abs_diff:
        out.append(f"max |Δ| {p['max_abs_diff']:.3e} > {tol.max_abs_diff:g}")
    if not p["cosine"] >= tol.min_cosine:
        out.append(f"cosine {p['cosine']:.6f} < {tol.min_cosine:g}")
    if not p["agreement"] >= tol.min_agreement:
        out.append(f"agreement {p['agreement']:.3f} < {tol.min_agreement:g}")
    return out


def _load(ctx: Any, pte: str) -> Any:
    try:
        return runner.load(ctx.out / pte, ctx.out / BASE_DATA)
    except Exception as exc:  # the runtime's own error, named: a program the device could not load either
        raise EdgeloraError(f"ExecuTorch cannot load {pte} with {BASE_DATA} ({type(exc).__name__}: {exc}); "
                            "re-run the export, and report it if it persists") from None


def verify(ctx: Any) -> None:
    runner.set_threads(ctx.threads)
    st = state(ctx)
    branch = st.branch = _load(ctx, BRANCH_PROGRAM)
    for name, task in st.tasks.items():
        ctx.step(f"verifying {name} against PEFT in PyTorch")
        merged = task.method = _load(ctx, task.program)
        modules, head = read_delta(ctx.out / task.delta)
        task.feeds = branch_feeds(modules, st.order, st.ranks, head, st.labels)
        checks: dict[str, dict[str, float] | None] = {"merged": None, "branches": None}
        for half in (False, True):
            inputs = _inputs(ctx, half_padded=half)
            ref = _reference(ctx, name, inputs)
            got = {"merged": runner.run(merged, inputs),
                   "branches": runner.run(branch, [*inputs, *task.feeds])[..., :task.labels]}
            for form, out in got.items():
                p, prev = _parity(out, ref), checks[form]
                checks[form] = p if prev is None else _worst(prev, p)
        task.parity = {form: p for form, p in checks.items() if p is not None}
        for form, p in task.parity.items():
            miss = _misses(p, ctx.target.tolerance)
            if miss:
                ctx.failures.append(f"{name} ({form}): {'; '.join(miss)}")


# ------------------------------------------------------------------------------------------------ 4. timings
def _interleaved(fns: dict[str, Any], runs: int, rounds: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median ms per function, timed in interleaved blocks so machine noise hits every one alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    per = max(1, runs // rounds)
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def switch_times(folder: Path, tasks: Mapping[str, tuple[str, str]], order: list[str], ranks: dict[str, int],
                 labels: int, runs: int = SWITCHES) -> dict[str, float]:
    """Median ms of a task switch in each form, alternating tasks (name -> (merged program, delta) inside
    ``folder``): loading the task's merged program against the shared base.ptd (XNNPACK packs its weights
    then), and reading the task's delta file into the branch program's feeds (the program stays loaded)."""
    names = list(tasks) if len(tasks) > 1 else [*tasks, *tasks]
    load, feed = [], []
    for i in range(runs):
        pte, delta = tasks[names[i % len(names)]]
        t0 = time.perf_counter()
        runner.load(folder / pte, folder / BASE_DATA)
        load.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        modules, head = read_delta(folder / delta)
        branch_feeds(modules, order, ranks, head, labels)
        feed.append(time.perf_counter() - t0)
    return {"load_merged_program_ms": statistics.median(load) * 1e3,
            "feed_branches_ms": statistics.median(feed) * 1e3}


def measure(ctx: Any) -> None:
    ctx.step("timing both forms and task switches")
    st = state(ctx)
    inputs = [torch.from_numpy(x) for x in _inputs(ctx)]
    fns = {}
    for name, task in st.tasks.items():
        fns[f"{name} merged"] = (lambda m=task.method: runner.call(m, inputs))
        fns[f"{name} branches"] = (lambda f=task.feeds: runner.call(st.branch, [*inputs, *f]))
    ms = _interleaved(fns, ctx.latency_runs)
    for name, task in st.tasks.items():
        task.latency_ms = {"merged": ms[f"{name} merged"], "branches": ms[f"{name} branches"]}
    st.switch = switch_times(ctx.out, {n: (t.program, t.delta) for n, t in st.tasks.items()}, st.order, st.ranks,
                             st.labels)


# ------------------------------------------------------------------------------------------------ 5. the folder
def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
    found = [src / n for n in names if (src / n).is_file()]
    if found:
        dst.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copyfile(f, dst / f.name)


def write_outputs(ctx: Any) -> None:
    ctx.step("writing manifest and report")
    _copy_tokenizer(ctx.base_path, ctx.out / TOKENIZER_DIR)
    st = state(ctx)
    size = {rel: e.size for rel, e in file_table(ctx.out, frozenset({".work"})).items()}
    tasks, rows = {}, {}
    for name, t in st.tasks.items():
        merged_bytes, delta_bytes = size[t.program], size[t.delta]
        tasks[name] = {"program": t.program, "delta": t.delta, "labels": t.labels,
                       "adapter_path": adapter_record(ctx.adapters[name]),
                       "adapter_hash": ctx.prepared[name].plan.adapter_hash, "rank": st.ranks}
        p = t.parity["merged"]
        rows[name] = {**p, "accuracy": None, "torch_accuracy": None, "latency_ms": t.latency_ms["merged"],
                      "engine_size_bytes": merged_bytes, "delta_size_bytes": delta_bytes, "task_bytes": merged_bytes,
                      "bake": "merged program (.pte) over the shared base.ptd",
                      "branches": {**t.parity["branches"], "latency_ms": t.latency_ms["branches"],
                                   "task_bytes": delta_bytes,
                                   "vs_merged": t.latency_ms["branches"] / t.latency_ms["merged"]}}
    branch_ms = statistics.median(t.latency_ms["branches"] for t in st.tasks.values())
    ctx.report = {
        "target": ctx.target.name, "precision": ctx.target.precision, "backend": ctx.target.backend,
        "base": {"fingerprint": ctx.base_fingerprint, "max_abs_diff": None, "cosine": None, "agreement": None,
                 "latency_ms": branch_ms, "size_bytes": size[BASE_DATA] + size[BRANCH_PROGRAM],
                 "base_data_bytes": size[BASE_DATA], "branch_program_bytes": size[BRANCH_PROGRAM]},
        "tasks": rows, "switch": st.switch,
        "machine": {"threads": ctx.threads, "executorch": _version()},
        "export_seconds": round(time.perf_counter() - ctx.started, 1),
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "target": ctx.target.to_json(),
                "task": ctx.task, "base": {"name": _base_name(ctx), "fingerprint": ctx.base_fingerprint,
                                           "data": BASE_DATA, "vocab_size": int(ctx.model_config.vocab_size)},
                "io": {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
                       "shape": [ctx.target.shapes.batch, ctx.target.shapes.sequence]},
                "branches": {"program": BRANCH_PROGRAM, "modules": st.order, "ranks": st.ranks,
                             "head": st.head, "labels": st.labels,
                             "pooling": next(iter(ctx.prepared.values())).head.pooling,
                             "feeds": "per module A^T (in, r), (s*B)^T (r, out), zero-padded to r; then head "
                                      "weight^T (in, labels) and bias (labels), zero-padded; logits cut to the "
                                      "task's labels"},
                "tasks": tasks}
    write_json(ctx.out / REPORT_JSON, ctx.report)
    (ctx.out / REPORT_MD).write_text(report_markdown(ctx.report), encoding="utf-8")
    manifest["files"] = {rel: e.to_json() for rel, e in file_table(ctx.out, frozenset({".work"})).items()}
    write_json(ctx.out / MANIFEST, manifest)


def _base_name(ctx: Any) -> str:
    """As the ONNX manifests name it: the bundled base by its name, any other by its absolute path (what
    ``edgelora bench`` loads PEFT's model over)."""
    return "all-MiniLM-L6-v2" if ctx.base is None else str(Path(ctx.base_path).resolve())


def _version() -> str:
    from importlib.metadata import version

    return version("executorch")


def report_markdown(report: dict[str, Any]) -> str:
    b, sw = report["base"], report["switch"]
    lines = [f"# edgelora export report: {report['target']} ({report['precision']}, executorch "
             f"{report['machine']['executorch']})", "",
             f"Base fingerprint `{b['fingerprint']}`; base.ptd {b['base_data_bytes']:,} bytes, shared by every "
             f"program; branch program lora.pte {b['branch_program_bytes']:,} bytes. Latency: median, "
             f"{report['machine']['threads']} threads, parity vs PEFT merge_and_unload in PyTorch.", "",
             "| task | form | max abs diff | cosine | latency | task file |", "|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        br = t["branches"]
        lines.append(f"| {name} | merged .pte | {t['max_abs_diff']:.2e} | {t['cosine']:.7f} | "
                     f"{t['latency_ms']:.2f} ms | {t['engine_size_bytes']:,} B |")
        lines.append(f"| {name} | branches (A, B fed) | {br['max_abs_diff']:.2e} | {br['cosine']:.7f} | "
                     f"{br['latency_ms']:.2f} ms ({br['vs_merged']:.2f}x merged) | {br['task_bytes']:,} B |")
    lines += ["", f"Task switch: load the merged program {sw['load_merged_program_ms']:.1f} ms; feed the branch "
                  f"program another task's delta {sw['feed_branches_ms']:.2f} ms (medians)."]
    return "\n".join(lines) + "\n"


STEPS = [check_request, build_programs, verify, measure, write_outputs]
