"""``edgelora bench DIR``: latency of a deployment folder's engines, side by side, as ratios.

Every engine of the folder (the base engine and each baked task engine), the base with each task's
LoRA as separate branches whose A, B are graph inputs (``base/lora.onnx``: how ONNX Runtime's
multi-LoRA API runs adapters) and, where torch and the adapter folders are at hand, PEFT's unmerged
model in PyTorch, run the same input at the target's
shape (encoders: batch × sequence tokens; decoders: one decode step at that context) with the same
thread count. Runs are interleaved in blocks (a few warm-up calls, then timed calls, engine after
engine, for several rounds) so that machine noise hits all of them alike; the result is the median
per engine and its ratio to the base engine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import EdgeloraError
from .format.layout import read_manifest_json as read_manifest


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 8, per_round: int = 10, warmup: int = 3,
                setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict[str, float]]:
    """Median per function over ``rounds`` blocks; ``setup[name]`` runs untimed before each of its blocks."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if setup and name in setup:
                setup[name]()
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "runs": len(v)}
            for k, v in times.items()}


def _with_adapters(manifest: dict[str, Any], adapters: Mapping[str, str | Path] | None, folder: Path
                   ) -> dict[str, Any]:
    """The manifest with each given task's adapter folder in place of what it records (for PEFT's model)."""
    for name, path in (adapters or {}).items():
        if name not in manifest["tasks"]:
            raise EdgeloraError(f"--adapter {name}=...: {folder} has no task {name!r}; tasks: "
                                f"{', '.join(manifest['tasks'])}")
        manifest["tasks"][name]["adapter_path"] = str(Path(path).resolve())
    return manifest


def _peft_unmerged(manifest: dict[str, Any], name: str, threads: int) -> Callable[[], Any] | None:
    """PEFT's unmerged LoRA model in PyTorch for one task, or None where it cannot be built here."""
    entry = manifest["tasks"][name]
    path = entry.get("adapter_path")
    if not path or not Path(path).is_dir():
        return None
    try:
        import torch
        from peft import PeftModel

        from .prepare import prepare
    except ImportError:
        return None
    torch.set_num_threads(threads)
    base = None if manifest["base"]["name"] == "all-MiniLM-L6-v2" else manifest["base"]["name"]
    model = PeftModel.from_pretrained(prepare(base, path).model, path).eval()
    return model


def _branch_fns(folder: Path, manifest: dict[str, Any], feeds: dict[str, Any], provider: str, threads: int
                ) -> dict[str, Callable[[], Any]]:
    """Each swappable task as LoRA branches on base/lora.onnx (how ONNX Runtime's multi-LoRA API runs it)."""
    from .format.delta import read_delta
    from .format.location import WeightLocation
    from .lora import stacked_feeds
    from .verify import session

    lora_graph = manifest.get("lora_graph")
    if not lora_graph:
        return {}
    lsess = session(folder / lora_graph["engine"], provider, threads)
    dims = {m: WeightLocation.from_json(d).dims() for m, d in lora_graph["modules"].items()}
    fns: dict[str, Callable[[], Any]] = {}
    for name, entry in manifest["tasks"].items():
        if not entry.get("swappable", True):
            continue  # DoRA / LoRA bias: not a W0 + s·B·A update, so no branch form
        modules, _ = read_delta(folder / entry["delta"])
        call = {**feeds, **stacked_feeds([modules], dims)}
        fns[f"{name} (LoRA branches, ONNX)"] = (lambda s=lsess, f=call: s.run(None, f))
    return fns


def _peft_fn(manifest: dict[str, Any], name: str, threads: int, feeds: dict[str, Any], batch: int, seq: int,
             vocab: int) -> Callable[[], Any] | None:
    """One call of PEFT's unmerged model on the engines' input (decoders: one decode step at the same context)."""
    import numpy as np

    model = _peft_unmerged(manifest, name, threads)
    if model is None:
        return None
    import torch

    ids = torch.from_numpy(np.ascontiguousarray(feeds["input_ids"]))
    if manifest["task"] == "causal-lm":
        # a cache of sequence-1 positions, one new token
        with torch.no_grad():
            prefix = torch.randint(5, vocab, (batch, seq - 1), generator=torch.Generator().manual_seed(0))
            cache = model(input_ids=prefix, use_cache=True).past_key_values

        def step(m: Any = model, c: Any = cache, i: Any = ids) -> Any:
            with torch.no_grad():
                out = m(input_ids=i, past_key_values=c, use_cache=True)
            c.crop(-i.shape[1])  # drop the new token: the same context for the next call
            return out

        return step
    mask = torch.ones_like(ids)

    def fwd(m: Any = model, i: Any = ids, k: Any = mask) -> Any:
        with torch.no_grad():
            return m(input_ids=i, attention_mask=k)

    return fwd


def bench(folder: str | Path, threads: int = 2, rounds: int = 8, per_round: int = 10, peft: bool = True,
          beside: str | Path | None = None, adapters: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """``beside``: for an ExecuTorch folder, a cpu-fp32 ONNX Runtime folder of the same adapters, timed with it.
    ``adapters``: task -> its PEFT folder, for PEFT's unmerged model (default: where the manifest says it was
    read from, relative to the working directory, where that is still a folder)."""
    import numpy as np

    from .format.files import check_sizes
    from .format.manifest import read_manifest as read_checked
    from .latency import latency_inputs
    from .verify import session

    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise EdgeloraError(f"{folder} has no manifest.json; pass a folder written by edgelora export")
    from .converters.executorch.layout import is_executorch

    if is_executorch(read_manifest(folder)):
        return bench_executorch(folder, threads, rounds, per_round, peft, beside, adapters)
    if beside is not None:
        raise EdgeloraError(f"--beside is for an ExecuTorch folder; {folder} is ONNX Runtime's: bench it alone")
    check_sizes(folder, read_checked(folder).files)  # the paths below are the checked manifest's, inside the folder
    manifest = _with_adapters(read_manifest(folder), adapters, folder)
    target = manifest["target"]
    batch, seq = target["shapes"]["batch"], target["shapes"]["sequence"]
    vocab = int(manifest["base"]["vocab_size"])
    engines = {"base": (folder / manifest["base"]["engine"], manifest["base"]["io"])}
    for name, entry in manifest["tasks"].items():
        if entry.get("engine"):
            engines[name] = (folder / entry["engine"], entry["engine_io"])
    fns: dict[str, Callable[[], Any]] = {}
    feeds_of: dict[str, dict[str, np.ndarray]] = {}
    for name, (path, io) in engines.items():
        sess = session(path, target["provider"], threads)
        feeds = latency_inputs(sess, io, batch, seq, vocab)
        feeds_of[name] = feeds
        fns[name] = (lambda s=sess, f=feeds: s.run(None, f))
    fns |= _branch_fns(folder, manifest, feeds_of["base"], target["provider"], threads)
    setup: dict[str, Callable[[], Any]] = {}
    rt = None
    if manifest.get("swap") or manifest.get("lora_graph"):
        from .runtime import Runtime

        rt = Runtime.open(folder, threads=threads)
        for name, entry in manifest["tasks"].items():
            if entry.get("swappable", True):
                key = f"{name} (runtime, {rt.mode})"
                fns[key] = (lambda r=rt, f=feeds_of["base"]: r.run(**f))
                setup[key] = (lambda r=rt, n=name: r.activate(n))
    if peft:
        for name in manifest["tasks"]:
            fn = _peft_fn(manifest, name, threads, feeds_of["base"], batch, seq, vocab)
            if fn is not None:
                fns[f"{name} (PEFT unmerged, PyTorch)"] = fn
    times = interleaved(fns, rounds, per_round, setup=setup)
    base_ms = times["base"]["median_ms"]
    rows = {}
    for name, t in times.items():
        row = {**t, "vs_base": t["median_ms"] / base_ms}
        task = name.split(" (")[0]
        if task in engines and task != "base" and name != task:
            row["vs_baked"] = t["median_ms"] / times[task]["median_ms"]
        rows[name] = row
    shape = f"decode step at context {seq}" if manifest["task"] == "causal-lm" else f"batch {batch} × {seq} tokens"
    swaps = swap_times(folder, manifest, rt, threads, peft=peft, rounds=max(rounds, 3),
                       run=lambda: rt.run(**feeds_of["base"])) if rt is not None else None
    from .latency import cpu_info

    return {"folder": str(folder), "target": target["name"], "threads": threads, "shape": shape, "engines": rows,
            "swap": swaps, "cpu": cpu_info()}


def swap_times(folder: Path, manifest: dict[str, Any], rt: Any, threads: int, peft: bool = True,
               rounds: int = 8, run: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Switching tasks three ways, medians: the runtime's ``activate``; opening a fresh ONNX Runtime session
    on the task's baked engine (a reload); PEFT in PyTorch (unmerge the old adapter, merge the new one).
    Back to back, as PEFT's is timed; with ``run`` (one inference), also ``activate`` right after a run, as
    when serving: the run has pushed W0 and the weight buffers out of the caches. Every timed ``activate``
    rebuilds (as to a task no slot holds); switching back to a task a slot still holds is timed apart
    (``flip``)."""
    from .verify import session

    names = [n for n, e in manifest["tasks"].items() if e.get("swappable", True)]
    if not names:
        return {}
    order = names if len(names) > 1 else [names[0], None]
    for name in order:  # first reads of the delta files are not what a swap costs
        rt.activate(name)
    act, flip = [], []
    for i in range(max(20, 10 * rounds)):
        rt._forget_built()
        t0 = time.perf_counter()
        rt.activate(order[i % len(order)])
        act.append(time.perf_counter() - t0)
    for i in range(max(20, 10 * rounds)):  # two states, both held: a switch is a flip
        t0 = time.perf_counter()
        rt.activate(order[i % len(order)])
        flip.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"mode": rt.mode, "activate_median_ms": statistics.median(act) * 1e3,
                           "activate_p90_ms": sorted(act)[int(0.9 * len(act))] * 1e3, "swaps": len(act),
                           "flip_median_ms": statistics.median(flip) * 1e3}
    recipes = {w.get("recipe") for w in (manifest.get("swap") or {}).get("weights", {}).values()}
    if rt.mode == "swap" and any(str(r).startswith("int8") for r in recipes):
        # int8 tasks keep their encoding after the first switch (what every timed switch above copied): the
        # first switch to a task re-quantizes, timed here with the kept encodings dropped before each switch
        first = []
        for i in range(max(20, 10 * rounds)):
            rt._forget_built(encodings=True)
            t0 = time.perf_counter()
            rt.activate(order[i % len(order)])
            first.append(time.perf_counter() - t0)
        out["activate_requantize_median_ms"] = statistics.median(first) * 1e3
    if run is not None:
        after = []
        for i in range(max(10, 3 * rounds)):
            run()
            rt._forget_built()
            t0 = time.perf_counter()
            rt.activate(order[i % len(order)])
            after.append(time.perf_counter() - t0)
        out["activate_after_run_median_ms"] = statistics.median(after) * 1e3
    engine = manifest["tasks"][names[0]].get("engine")
    if engine:
        opens = []
        for _ in range(max(3, rounds // 2)):
            t0 = time.perf_counter()
            session(folder / engine, manifest["target"]["provider"], threads)
            opens.append(time.perf_counter() - t0)
        out["open_session_median_ms"] = statistics.median(opens) * 1e3
        out["open_vs_activate"] = out["open_session_median_ms"] / out["activate_median_ms"]
    if peft:
        switch = _peft_switch(manifest, names, threads, max(10, 3 * rounds))
        if switch is not None:
            out["peft_switch_median_ms"] = switch
            out["peft_vs_activate"] = switch / out["activate_median_ms"]
    return out


def _peft_switch(manifest: dict[str, Any], names: list[str], threads: int, runs: int) -> float | None:
    """Median ms of a task switch in PEFT/PyTorch: ``unmerge_adapter`` then ``merge_adapter`` (the weight
    work of leaving one merged task for another; tasks with different heads cannot share one PeftModel)."""
    path = manifest["tasks"][names[0]].get("adapter_path")
    if not path or not Path(path).is_dir():
        return None
    model = _peft_unmerged(manifest, names[0], threads)
    if model is None:
        return None
    model.merge_adapter()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.unmerge_adapter()
        model.merge_adapter()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_table(result: dict[str, Any]) -> str:
    from .latency import cpu_line

    if result.get("backend") == "executorch":
        from .converters.executorch.bench import table

        return table(result, cpu_line())

    lines = [f"{result['folder']}: {result['target']}, {result['shape']}, {result['threads']} threads, "
             "interleaved runs, medians", cpu_line()]
    width = max(len(k) for k in result["engines"])
    lines.append(f"{'engine'.ljust(width)}  {'median':>10}  {'vs base':>8}  {'vs baked':>8}")
    for name, r in result["engines"].items():
        baked = f"{r['vs_baked']:.2f}x" if "vs_baked" in r else "-"
        lines.append(f"{name.ljust(width)}  {r['median_ms']:8.2f}ms  {r['vs_base']:7.3f}x  {baked:>8}")
    sw = result.get("swap")
    if sw:
        lines.append(f"task switch ({sw['mode']}): activate {sw['activate_median_ms']:.2f} ms median "
                     f"(p90 {sw['activate_p90_ms']:.2f} ms, {sw['swaps']} swaps back to back)")
        if "activate_requantize_median_ms" in sw:
            lines.append(f"  first switch to an int8 task (re-quantizes; later ones copy its kept encoding): "
                         f"{sw['activate_requantize_median_ms']:.2f} ms median")
        if "flip_median_ms" in sw:
            lines.append(f"  back to a task a slot still holds (no rebuild): {sw['flip_median_ms']:.3f} ms median")
        if "activate_after_run_median_ms" in sw:
            lines.append(f"  activate right after a run (caches cold): {sw['activate_after_run_median_ms']:.2f} ms "
                         "median")
        if "open_session_median_ms" in sw:
            lines.append(f"  fresh ONNX Runtime session for a task engine: {sw['open_session_median_ms']:.1f} ms "
                         f"({sw['open_vs_activate']:.0f}x activate)")
        if "peft_switch_median_ms" in sw:
            lines.append(f"  PEFT unmerge + merge in PyTorch: {sw['peft_switch_median_ms']:.1f} ms "
                         f"({sw['peft_vs_activate']:.1f}x activate)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- ExecuTorch folders
def _beside_folder(beside: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``--beside`` folder's raw manifest, checked to hold ONNX Runtime fp32 engines of the same tasks."""
    from .converters.executorch.layout import is_executorch
    from .format.files import check_sizes
    from .format.manifest import read_manifest as read_checked

    if not (beside / "manifest.json").is_file():
        raise EdgeloraError(f"--beside {beside} has no manifest.json; pass a cpu-fp32 folder (edgelora export "
                            "--target cpu-fp32) of the same adapters")
    if is_executorch(read_manifest(beside)):
        raise EdgeloraError(f"--beside {beside} is an ExecuTorch folder; pass a cpu-fp32 folder (edgelora export "
                            "--target cpu-fp32) of the same adapters")
    check_sizes(beside, read_checked(beside).files)
    ort = read_manifest(beside)
    t = ort["target"]
    if t["precision"] != "fp32" or t["provider"] != "CPUExecutionProvider":
        raise EdgeloraError(f"--beside {beside} is {t['name']} ({t['precision']}, {t['provider']}); pass a cpu-fp32 "
                            "folder (ONNX Runtime fp32 on the CPU) of the same adapters")
    if ort["base"]["fingerprint"] != manifest["base"]["fingerprint"]:
        raise EdgeloraError(f"--beside {beside} was exported over another base; export cpu-fp32 over the same one")
    for name, task in manifest["tasks"].items():
        other = ort["tasks"].get(name)
        if other is None or not other.get("engine") or other.get("adapter_hash") != task.get("adapter_hash"):
            raise EdgeloraError(f"--beside {beside} has no baked engine of task {name} from the same adapter; "
                                "export cpu-fp32 with the same adapters")
    return ort


def bench_executorch(folder: Path, threads: int, rounds: int, per_round: int, peft: bool,
                     beside: str | Path | None, adapters: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """An ExecuTorch folder (``converters/executorch/``): per task its merged program and the branch program fed
    its delta, interleaved on the same inputs with ONNX Runtime's fp32 engine of the task from ``beside``;
    each form's task file, max |Δ| against PyTorch (PEFT unmerged; ``peft``), the export's and ONNX Runtime's;
    task switch times of both runtimes."""
    import numpy as np

    from .converters.executorch import bench as et
    from .converters.executorch.runner import unavailable
    from .latency import cpu_info
    from .verify import fixed_inputs, session

    why = unavailable()
    if why is not None:
        raise EdgeloraError(f"{folder} is an ExecuTorch folder; {why}")
    manifest = _with_adapters(read_manifest(folder), adapters, folder)
    beside = Path(beside) if beside is not None else None
    ort = _beside_folder(beside, manifest) if beside is not None else None
    progs = et.open_programs(folder, manifest, threads)
    batch, seq = progs.shape
    feeds = fixed_inputs(int(manifest["base"]["vocab_size"]), batch, seq, seed=7)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    fns: dict[str, Callable[[], Any]] = {}
    exported, rows = et.export_parity(folder), {}
    for name, forms in et.calls(progs, ids, mask).items():
        got = et.logits(progs, name, ids, mask)
        diff: dict[str, dict[str, float]] = {"vs_pytorch": {}, "export": exported.get(name, {}), "vs_ort": {}}
        size: dict[str, int] = {}
        for form, fn in forms.items():
            fns[f"{name}: ET {form}"] = fn
        if ort is not None:
            engine = beside / ort["tasks"][name]["engine"]
            sess = session(engine, "CPUExecutionProvider", threads)
            ort_feeds = {i.name: feeds.get(i.name, np.zeros_like(ids)) for i in sess.get_inputs()}
            fns[f"{name}: ORT fp32"] = (lambda s=sess, f=ort_feeds: s.run(None, f))
            ref = sess.run(["logits"], ort_feeds)[0]
            diff["vs_ort"] = {form: float(np.abs(out - ref).max()) for form, out in got.items()}
            size["ort_engine"] = ort["files"][ort["tasks"][name]["engine"]]["size"]  # its own file
            size["ort_delta"] = ort["files"][ort["tasks"][name]["delta"]]["size"]
        model = _peft_torch(manifest, name, threads) if peft else None
        if model is not None:
            import torch

            with torch.no_grad():
                ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
            diff["vs_pytorch"] = {form: float(np.abs(out - ref).max()) for form, out in got.items()}
        rows[name] = {"max_abs_diff": diff, "bytes": size}
    times = interleaved(fns, rounds, per_round)
    sizes = et.file_sizes(progs)
    for name, row in rows.items():
        row["latency_ms"] = {f"et_{form}": times[f"{name}: ET {form}"]["median_ms"] for form in et.FORMS}
        if ort is not None:
            row["latency_ms"]["ort_fp32"] = times[f"{name}: ORT fp32"]["median_ms"]
        t = sizes["tasks"][name]
        row["bytes"] |= {"et_merged_pte": t["merged_pte"], "et_delta": t["delta"]}
    sw = et.switch(progs, runs=max(6, 2 * rounds))
    switch: dict[str, Any] = {"et_load_merged_program": sw["load_merged_program_ms"],
                              "et_feed_branches": sw["feed_branches_ms"]}
    if ort is not None:
        from .runtime import Runtime

        rt = Runtime.open(beside, threads=threads)
        ort_sw = swap_times(beside, ort, rt, threads, peft=False, rounds=max(rounds, 3))
        switch |= {"ort_runtime_activate": ort_sw.get("activate_median_ms"),
                   "ort_fresh_session": ort_sw.get("open_session_median_ms")}
    return {"folder": str(folder), "target": manifest["target"]["name"], "backend": "executorch",
            "executorch": et.version(), "threads": threads, "shape": f"batch {batch} × {seq} tokens",
            "beside": str(beside) if beside is not None else None,
            "bytes": {"base_ptd": sizes["base_ptd"], "branch_pte": sizes["branch_pte"]}, "tasks": rows,
            "switch_ms": switch, "cpu": cpu_info()}


def _peft_torch(manifest: dict[str, Any], name: str, threads: int) -> Any:
    """PEFT's unmerged model of one task in PyTorch, or None where it cannot be built here (a moved adapter,
    a base this edgelora cannot resolve by the manifest's name)."""
    try:
        return _peft_unmerged(manifest, name, threads)
    except (EdgeloraError, OSError, ValueError):
        return None
