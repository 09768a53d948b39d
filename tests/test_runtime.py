"""edgelora.runtime against the baked engines, the real peft library and ONNX Runtime's own LoRA API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import FAMILIES, REPO, make_peft_adapter, peft_reference

from edgelora.format.layout import read_manifest_json as read_manifest
from edgelora.runtime import DeltaError, Runtime

CPU = ["CPUExecutionProvider"]


def _ids(vocab: int, batch: int = 2, seq: int = 10, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq), dtype=np.int64)


def _engine(dep: Path, rel: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(dep / rel), providers=CPU)


def _engine_run(sess: ort.InferenceSession, feeds: dict, io: dict) -> dict:
    """One call of a baked engine (decoders: an empty KV cache)."""
    feeds = dict(feeds)
    if io["kind"] == "causal-lm":
        for n in io["inputs"]:
            if n.startswith("past_key_values."):
                feeds[n] = np.zeros((feeds["input_ids"].shape[0], io["num_kv_heads"], 0, io["head_dim"]), np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def _mask(ids: np.ndarray) -> np.ndarray:
    mask = np.ones_like(ids)
    mask[-1, -3:] = 0  # one padded row
    return mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activate_gives_each_baked_engines_outputs(family, exported):
    """After every swap (t1, t2, t1, base, t2) run() equals that task's baked engine (fp32: max |Δ| ≤ 1e-5),
    and None gives the base engine back: the weights are rebuilt from W0, never by subtraction."""
    dep = exported[family]
    manifest = read_manifest(dep)
    io = manifest["base"]["io"]
    assert Runtime.open(dep).mode == ("unmerged" if io["kind"] == "causal-lm" else "swap")  # the measured default
    rt = Runtime.open(dep, threads=2, unmerged=False)  # weights rebuilt in place, for every family
    assert rt.mode == "swap" and rt.tasks == ["t1", "t2"] and rt.active is None
    ids = _ids(manifest["base"]["vocab_size"])
    feeds = {"input_ids": ids, "attention_mask": _mask(ids) if io["kind"] != "causal-lm" else np.ones_like(ids)}
    key = "logits" if io["kind"] == "causal-lm" or family == "bert" else "last_hidden_state"
    baked = {t: _engine_run(_engine(dep, manifest["tasks"][t]["engine"]), feeds, io)["logits"] for t in rt.tasks}
    base = _engine_run(_engine(dep, manifest["base"]["engine"]), feeds, io)
    base_key = "logits" if io["kind"] == "causal-lm" else "pooler_output"
    for task in ["t1", "t2", "t1", None, "t2"]:
        rt.activate(task)
        assert rt.active == task
        out = rt.run(**feeds)
        if task is None:
            assert np.abs(out[base_key] - base[base_key]).max() <= 1e-5
        else:
            assert np.abs(out[key] - baked[task]).max() <= 1e-5, (family, task)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_swap_rebuilds_the_baked_engines_weights_bit_for_bit(family, tiny_dir, tmp_path):
    """fp32 swap graphs feed their weights (out, in), read transposed (FusedMatMul / Gemm transB), and the
    exporter merges each weight in that layout: every weight the runtime rebuilds is, bit for bit, a
    weight of the task's baked engine (found by exact content among the engine's initializers). Rank 8:
    from rank 8 on, the (in, out) and (out, in) products differ in the last bit, so a merge in the other
    layout fails here."""
    import onnx
    from edgelora.converters.onnx.names import WeightLocation, build_name_map

    from edgelora.cli import main
    from edgelora.format.delta import read_delta
    from edgelora.format.manifest import parse_manifest
    from edgelora.runtime.swap import SwapWeights, load_w0

    task_type, kw, labels = FAMILIES[family]
    kw = {k: v for k, v in kw.items() if k != "rank_pattern"} | {"r": 8}
    adapter = make_peft_adapter(tiny_dir(family), tmp_path / "a", seed=5, num_labels=labels, task_type=task_type, **kw)
    dep = tmp_path / "dep"
    main(["export", "--base", str(tiny_dir(family)), "--adapter", f"t={adapter}", "--target", "cpu-fp32",
          "-o", str(dep), "-q"])
    manifest = read_manifest(dep)
    swap = manifest["swap"]
    graph = onnx.load(str(dep / swap["engine"]), load_external_data=False).graph
    readers = [n for n in graph.node if len(n.input) > 1 and n.input[1] in swap["weights"]]
    assert readers and all(n.op_type in ("FusedMatMul", "Gemm") and {a.name: a.i for a in n.attribute}["transB"] == 1
                           for n in readers), family
    typed = parse_manifest(manifest)
    spec = typed.swap
    weights = SwapWeights(spec.weights, load_w0(dep, typed.files, spec), spec.modules, threads=2)
    modules, _ = read_delta(dep / manifest["tasks"]["t"]["delta"])
    weights.build(weights.slots[0], modules)
    rebuilt = {m: WeightLocation.from_json(d).read(weights.slots[0].arrays[d["initializer"]])
               for m, d in swap["modules"].items()}
    baked = onnx.load(str(dep / manifest["tasks"]["t"]["engine"]))
    assert set(build_name_map(baked, rebuilt)) == set(rebuilt)  # raises where a weight has no exact match


def test_a_swap_leaves_numpys_blas_threads_as_it_found_them(exported):
    """A swap runs its small GEMMs at one BLAS thread (OpenBLAS would fan each out over the cores its own
    threads use), for the swap only: afterwards the application's numpy has its thread count back. numpy's
    OpenBLAS keeps one count per process, even through ``openblas_set_num_threads_local``. Read by
    threadpoolctl, at a count (3) that no swap sets."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def openblas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas"]

    with threadpool_limits(3, user_api="blas"):
        assert openblas_threads() and set(openblas_threads()) == {3}
        rt = Runtime.open(exported["bert"], threads=2, unmerged=False)
        for task in ["t1", "t2", None, "t1"]:
            rt.activate(task)
            assert set(openblas_threads()) == {3}, task


def test_engine_threads_stop_spinning_when_a_run_returns(exported):
    """Between runs the app tokenizes, swaps tasks, draws: the engine's worker threads must not keep a core
    busy once ``run`` returns (ONNX Runtime's default spins them on, ~a whole core for 50 ms and more).
    Process CPU time over 50 ms of idle after a run, at 2 threads."""
    import time

    rt = Runtime.open(exported["bert"], threads=2, unmerged=False)
    ids = _ids(read_manifest(exported["bert"])["base"]["vocab_size"], batch=4, seq=64)
    rt.activate("t1")
    for _ in range(3):
        rt.run(input_ids=ids)
    burnt = []
    for _ in range(5):
        rt.run(input_ids=ids)
        c0 = time.process_time()
        time.sleep(0.05)
        burnt.append(time.process_time() - c0)
    assert sorted(burnt)[2] < 0.010, burnt


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_follows_peft_greedy_decoding(family, family_adapters, exported):
    """generate() through the KV cache = the peft-merged model's greedy tokens, per task, after swaps."""
    base, adapters = family_adapters[family]
    rt = Runtime.open(exported[family], threads=2, unmerged=family == "gpt2")  # one of each mode
    prompt = _ids(rt.manifest.base.vocab_size, 1, 6)[0]
    for task in ["t2", "t1"]:
        _, merged = peft_reference(base, adapters[task], "CAUSAL_LM")
        with torch.no_grad():
            ref = merged.generate(torch.from_numpy(prompt)[None], max_new_tokens=8, do_sample=False,
                                  min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()
        rt.activate(task)
        streamed: list[int] = []
        got = rt.generate(prompt, 8, stream=streamed.append)
        assert got == ref and streamed == ref, (family, task)
    sampled = rt.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1)
    assert sampled == rt.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1) and len(sampled) == 5


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_mixed_task_batch_rows_equal_each_tasks_engine(family, exported):
    """run(tasks=[...]) serves rows of different tasks (and the base) in one call on base/lora.onnx."""
    dep = exported[family]
    manifest = read_manifest(dep)
    io = manifest["base"]["io"]
    rt = Runtime.open(dep, threads=2)
    ids = _ids(manifest["base"]["vocab_size"], batch=4)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows = ["t1", "t2", "t2", "t1"]
    got = rt.run(**feeds, tasks=rows)["logits"]
    for i, task in enumerate(rows):
        ref = _engine_run(_engine(dep, manifest["tasks"][task]["engine"]),
                          {k: v[i:i + 1] for k, v in feeds.items()}, io)["logits"]
        assert np.abs(got[i] - ref[0]).max() <= 1e-4, (family, i, task)
    assert rt.active is None  # a mixed batch does not change the active task


def test_mixed_feeds_from_cached_task_feeds_equal_the_stacked_ones():
    """The runtime joins each task's cached branch feeds (concat_feeds); the result is, bit for bit,
    what stacked_feeds builds from the deltas: ranks differ, one task lacks a module."""
    from types import SimpleNamespace

    from edgelora.lora import concat_feeds, stacked_feeds

    rng = np.random.default_rng(0)
    dims = {"q": (6, 5), "v": (6, 3)}

    def delta(r, modules):
        return {m: SimpleNamespace(A=rng.standard_normal((r, dims[m][0]), dtype=np.float32),
                                   B=rng.standard_normal((dims[m][1], r), dtype=np.float32), scale=0.5 * r)
                for m in modules}

    tasks = [delta(2, "qv"), delta(4, "q"), delta(1, "qv")]
    rows = [2, 0, 1, 1, 0]
    want = stacked_feeds(tasks, dims, rows)
    got = concat_feeds([stacked_feeds([t], dims) for t in tasks], rows)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


def test_ort_adapter_files_run_on_the_lora_graph(exported):
    """Each task's adapter.onnx_adapter, activated with ONNX Runtime's own API, reproduces its engine."""
    dep = exported["llama"]
    manifest = read_manifest(dep)
    io = manifest["base"]["io"]
    lora = _engine(dep, manifest["lora_graph"]["engine"])
    ids = _ids(manifest["base"]["vocab_size"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for task, entry in manifest["tasks"].items():
        adapter = ort.LoraAdapter()
        adapter.Load(str(dep / entry["ort_adapter"]))  # memory-mapped by ONNX Runtime
        opts = ort.RunOptions()
        opts.add_active_adapter(adapter)
        call = dict(feeds)
        call |= {n: np.zeros((2, io["num_kv_heads"], 0, io["head_dim"]), np.float32)
                 for n in io["inputs"] if n.startswith("past_key_values.")}
        got = lora.run(["logits"], call, opts)[0]
        ref = _engine_run(_engine(dep, entry["engine"]), feeds, io)["logits"]
        assert np.abs(got - ref).max() <= 1e-4, task


def _copy_dep(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_failed_activate_or_load_leaves_the_previous_task(exported, tmp_path):
    """Corrupt delta, delta for another base, wrong shapes: one-line DeltaError, the active task and its
    outputs unchanged; then a good file loads under a new name."""
    from safetensors.numpy import load_file, save_file

    dep = _copy_dep(exported["bert"], tmp_path / "dep")
    rt = Runtime.open(dep, threads=2)
    ids = _ids(rt.manifest.base.vocab_size)
    rt.activate("t1")
    before = rt.run(input_ids=ids)["logits"]

    good = dep / "tasks/t2/delta.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:1000])
    other_base = tmp_path / "other.safetensors"
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), "np") as f:
        meta = dict(f.metadata())
    save_file(tensors, str(other_base), {**meta, "base_fingerprint": "0" * 64})
    wrong_shape = tmp_path / "shape.safetensors"
    key = next(k for k in tensors if k.endswith("lora_A"))
    save_file({**tensors, key: np.zeros((4, 7), np.float32)}, str(wrong_shape), meta)
    nan = tmp_path / "nan.safetensors"
    save_file({**tensors, key: np.full_like(tensors[key], np.nan)}, str(nan), meta)

    for bad, needle in [(corrupt, "safetensors"), (other_base, "base"), (wrong_shape, "do not fit"),
                        (nan, "Inf/NaN"), (tmp_path / "missing.safetensors", "no such")]:
        with pytest.raises(DeltaError) as err:
            rt.load("t3", bad)
        assert needle in str(err.value) and "\n" not in str(err.value) and str(bad) in str(err.value)
        assert rt.active == "t1" and "t3" not in rt.tasks
        assert np.array_equal(rt.run(input_ids=ids)["logits"], before)
    # a manifest task whose file went bad after open: deltas were read and checked at open, so a resident task
    # is unaffected; one evicted by the LRU bound is read again on activate, refused, and nothing changes
    small = Runtime.open(dep, threads=2, max_resident=1)  # t1 evicted at open by t2
    small.activate("t2")
    t1 = dep / "tasks/t1/delta.safetensors"
    t1.write_bytes(t1.read_bytes()[:500])
    with pytest.raises(DeltaError, match="t1/delta.safetensors"):
        small.activate("t1")
    assert small.active == "t2"
    good.write_bytes(good.read_bytes()[:500])
    rt.activate("t2")  # resident since open: its checked bytes are in memory
    assert rt.active == "t2"
    rt.activate("t1")
    assert np.array_equal(rt.run(input_ids=ids)["logits"], before)
    # a good file under a new name, then unload
    rt.load("t3", exported["bert"] / "tasks/t2/delta.safetensors")
    rt.activate("t3")
    ref = _engine_run(_engine(exported["bert"], rt.manifest.tasks["t2"].engine), {"input_ids": ids,
                      "attention_mask": np.ones_like(ids)}, rt.manifest.raw["base"]["io"])["logits"]
    assert np.abs(rt.run(input_ids=ids)["logits"] - ref).max() <= 1e-5
    with pytest.raises(Exception, match="active"):
        rt.unload("t3")
    rt.activate("t1")
    rt.unload("t3")
    assert "t3" not in rt.tasks


def test_lru_bound_keeps_the_active_task_and_reloads_on_demand(exported, tmp_path):
    dep = _copy_dep(exported["bert"], tmp_path / "dep")
    for i in range(3, 7):
        shutil.copytree(dep / "tasks/t1", dep / f"tasks/t{i}")
    rt = Runtime.open(dep, threads=1, max_resident=2)
    for i in range(3, 7):
        rt.load(f"t{i}", dep / f"tasks/t{i}/delta.safetensors")
    assert len(rt.store.resident) <= 2
    ids = _ids(rt.manifest.base.vocab_size)
    rt.activate("t3")
    first = rt.run(input_ids=ids)["logits"]
    for name in ["t4", "t5", "t6", "t2", "t3"]:
        rt.activate(name)
        assert len(rt.store.resident) <= 2 and rt.active in rt.store.resident
    assert np.array_equal(rt.run(input_ids=ids)["logits"], first)  # t3 again, re-read from disk


def test_soak_four_readers_one_swapper_never_see_a_mixture(exported):
    """4 inference threads and 1 thread doing 1,000 swaps: every output is exactly one task's output
    (t1, t2 or the base), and resident memory does not grow (< 2%)."""
    import psutil

    dep = exported["bert"]
    rt = Runtime.open(dep, threads=1)
    ids = _ids(rt.manifest.base.vocab_size, batch=1, seq=8)
    expected = {}
    for task in ("t1", "t2"):
        rt.activate(task)
        expected[task] = rt.run(input_ids=ids)["logits"]
    rt.activate(None)
    expected[None] = rt.run(input_ids=ids)["pooler_output"]
    assert np.abs(expected["t1"] - expected["t2"]).max() > 1e-3
    proc = psutil.Process()
    for _ in range(50):  # warm every path before the memory baseline
        rt.activate("t1")
        rt.activate("t2")
        rt.run(input_ids=ids)
    rss0 = proc.memory_info().rss
    stop = threading.Event()
    bad: list[str] = []
    counts = [0] * 4

    def reader(k: int) -> None:
        while not stop.is_set():
            out = rt.run(input_ids=ids)
            got = out.get("logits", out.get("pooler_output"))
            if not any(got.shape == e.shape and np.array_equal(got, e) for e in expected.values()):
                bad.append(f"thread {k}: output matches no task")
            counts[k] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    order = ["t1", "t2", None]
    for i in range(1000):
        rt.activate(order[i % 3])
    stop.set()
    for t in threads:
        t.join()
    growth = (proc.memory_info().rss - rss0) / rss0
    assert not bad, bad[:3]
    assert min(counts) > 0
    assert growth < 0.02, f"RSS grew {growth:.1%}"


def test_runtime_imports_no_torch_transformers_peft_or_onnx(exported, tmp_path):
    """In a process where importing torch, transformers, peft or onnx raises, the runtime opens a
    deployment, runs every task and generates; its outputs match the baked engines run here."""
    results = {}
    for family in ("bert", "llama"):
        dep = exported[family]
        manifest = read_manifest(dep)
        ids = _ids(manifest["base"]["vocab_size"])
        np.save(tmp_path / f"{family}_ids.npy", ids)
        results[family] = {t: _engine_run(_engine(dep, e["engine"]), {"input_ids": ids,
                           "attention_mask": np.ones_like(ids)}, manifest["base"]["io"])["logits"]
                           for t, e in manifest["tasks"].items()}
    script = f"""
import sys, importlib.abc
BLOCKED = ("torch", "transformers", "peft", "onnx")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked on the device: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from edgelora.runtime import Runtime
for family, dep in {json.dumps({f: str(exported[f]) for f in results})}.items():
    rt = Runtime.open(dep, threads=1)
    ids = np.load(r"{tmp_path}/" + family + "_ids.npy")
    for task in rt.tasks:
        rt.activate(task)
        np.save(r"{tmp_path}/" + family + "_" + task + ".npy", rt.run(input_ids=ids)["logits"])
    if rt.kind == "causal-lm":
        assert len(rt.generate(ids[0], 3)) == 3
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(sys.modules)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    for family, tasks in results.items():
        for task, ref in tasks.items():
            got = np.load(tmp_path / f"{family}_{task}.npy")
            assert np.abs(got - ref).max() <= 1e-5, (family, task)


def test_bad_folder_and_unknown_task_are_one_line_errors(exported, tmp_path, cli):
    from edgelora.errors import EdgeloraError

    with pytest.raises(EdgeloraError, match="manifest.json"):
        Runtime.open(tmp_path)
    old = shutil.copytree(exported["bert"], tmp_path / "old")  # a folder from an earlier format
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(EdgeloraError, match="format 1, this runtime reads 3; re-export"):
        Runtime.open(old)
    rt = Runtime.open(exported["bert"])
    with pytest.raises(EdgeloraError, match="no task 'nope'"):
        rt.activate("nope")
    res = cli("run", exported["bert"], "--task", "nope", "--text", "hi")
    assert res.code == 2 and res.err.count("\n") == 1 and "no task 'nope'" in res.err


def test_cli_run_classifies_text_with_the_tiny_tokenizer(exported, cli):
    res = cli("run", exported["bert"], "--task", "t1", "--text", "abc", "--text", "hello there", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["mode"] == "swap" and len(out["results"]) == 2
    assert all(0 < r["probability"] <= 1 for r in out["results"])
    res = cli("run", exported["llama"], "--task", "t2", "--text", "abc", "--max-new-tokens", "4", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["results"][0]["tokens"] == 4


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_unmerged_mode_runs_tasks_as_lora_branches(family, exported):
    """Runtime.open(unmerged=True): no weight rebuild, the task's A, B fed to base/lora.onnx; same outputs
    as the baked engines (within fp32 rounding of the unmerged sum)."""
    dep = exported[family]
    manifest = read_manifest(dep)
    io = manifest["base"]["io"]
    rt = Runtime.open(dep, threads=1, unmerged=True)
    assert rt.mode == "unmerged"
    ids = _ids(manifest["base"]["vocab_size"])
    for task in ["t2", "t1", "t2"]:
        rt.activate(task)
        ref = _engine_run(_engine(dep, manifest["tasks"][task]["engine"]), {"input_ids": ids,
                          "attention_mask": np.ones_like(ids)}, io)["logits"]
        assert np.abs(rt.run(input_ids=ids)["logits"] - ref).max() <= 1e-4, (family, task)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_bench_and_benchmark_report_the_runtime(family, exported, cli):
    """`edgelora bench` lines up the runtime after a switch beside the baked engines and times the switch;
    Runtime.benchmark() measures run and activate (smoke-level: the numbers exist and are positive)."""
    res = cli("bench", exported[family], "--rounds", "1", "--no-peft", "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    mode = "unmerged" if family == "llama" else "swap"
    assert {f"t1 (runtime, {mode})", f"t2 (runtime, {mode})"} <= set(result["engines"])
    assert result["swap"]["mode"] == mode and result["swap"]["activate_median_ms"] > 0
    assert result["swap"]["open_session_median_ms"] > 0
    b = Runtime.open(exported[family], threads=1).benchmark(runs=3, swaps=4, sequence=8)
    assert b["run_median_ms"] > 0 and b["activate_median_ms"] > 0 and b["mode"] == mode
