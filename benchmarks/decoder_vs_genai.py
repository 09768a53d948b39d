"""edgelora vs ONNX Runtime GenAI on the W2 decoder, side by side in one run: generation with a LoRA task active.

    pip install onnxruntime-genai            # the peer (also: pip install 'edgelora[genai]')
    python benchmarks/decoder_vs_genai.py [--precision fp32 int4] [--tasks 8] [--rounds 8] [--json out.json]

W2 (the SmolLM2-135M architecture, seeded weights; LoRA r=16 on q,k,v,o made by peft), batch 1, a 128-token
prompt then 64 greedy tokens, 2 threads, medians of ``--rounds`` interleaved rounds.

The peer is deployed as its documentation says: the model builder writes the base graph, and once per adapter
the graph with LoRA branches (``--extra_options adapter_path=...``); the branches' weights become graph inputs
and each adapter's weights an ``.onnx_adapter`` file (what Olive's ``extract-adapters`` does), loaded with
``og.Adapters`` and switched with ``Generator.set_active_adapter``.

edgelora: ``edgelora export --target cpu-{fp32,int4}-gqa`` (the same builder graph; tasks merged into the
base engine's weights), run by ``edgelora.runtime.Runtime.generate`` in each mode the folder offers:
``engines`` (each task's baked engine), ``unmerged`` (LoRA branches, A and B fed), ``swap`` (weights rebuilt).

Printed per precision: decode tokens/s and first-token time for both systems, the base and a task; switch time
between tasks; resident memory with ``--tasks`` tasks loaded (each system in a process of its own); greedy-token
agreement with PyTorch + PEFT; build time and deployed size. Ratios are edgelora / GenAI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from workloads import make_w2_adapter, make_w2_base  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cpu_line() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(shown) or 'no AVX2'})"


def prompt_ids(n: int) -> list[int]:
    return np.random.default_rng(0).integers(10, 100, n).tolist()


# ------------------------------------------------------------------------------------------ building
def build_edgelora(base: Path, adapters: dict[str, Path], precision: str, out: Path) -> float:
    if (out / "manifest.json").is_file():
        return json.loads((out / "bench-build.json").read_text())["seconds"]
    cmd = [PY, "-m", "edgelora.cli", "export", "--base", str(base), "--target", f"cpu-{precision}-gqa", "-o",
           str(out), "--force", "-q", "--keep-failed"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if not (out / "manifest.json").is_file():
        sys.exit(f"edgelora export failed: {done.stderr.strip().splitlines()[-1:]}")
    (out / "bench-build.json").write_text(json.dumps({"seconds": seconds, "exit": done.returncode,
                                                      "stderr": done.stderr.strip()[-600:]}))
    return seconds


def _builder(src: Path, out: Path, precision: str, adapter: Path | None = None) -> None:
    cmd = [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision, "-e", "cpu",
           "-c", str(out.parent / "genai-cache"), "--extra_options", "hf_token=false"]
    if adapter is not None:
        cmd.append(f"adapter_path={adapter}")
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"GenAI's model builder failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def build_genai(base: Path, adapters: dict[str, Path], precision: str, work: Path) -> tuple[Path, Path, float]:
    """(base folder, multi-LoRA folder with one .onnx_adapter per task, seconds to build both)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    base_out, multi = work / f"genai-{precision}-base", work / f"genai-{precision}-lora"
    stamp = work / f"genai-{precision}.json"
    if stamp.is_file():
        return base_out, multi, json.loads(stamp.read_text())["seconds"]
    t = time.perf_counter()
    _builder(base, base_out, precision)
    per_task = {}
    for name, path in adapters.items():
        _builder(base, work / f"genai-{precision}-{name}", precision, path)
        per_task[name] = work / f"genai-{precision}-{name}"
    first = next(iter(per_task.values()))
    model = onnx.load(str(first / "model.onnx"))
    for init in model.graph.initializer:  # the LoRA weights become inputs (their values the defaults)
        if ".lora_" in init.name:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    multi.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(multi / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for f in first.iterdir():
        if f.suffix in (".json",) or f.name.startswith("tokenizer"):
            shutil.copy2(f, multi / f.name)
    for name, folder in per_task.items():
        weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer
                   if ".lora_" in i.name}
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items()})
        fmt.export_adapter(str(multi / f"{name}.onnx_adapter"))
        if folder != first:
            shutil.rmtree(folder)
    shutil.rmtree(first)
    seconds = time.perf_counter() - t
    stamp.write_text(json.dumps({"seconds": seconds}))
    return base_out, multi, seconds


def folder_mb(folder: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) / 1e6


# ------------------------------------------------------------------------------------------ the systems
def genai_threads(folder: Path, threads: int, max_length: int) -> None:
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"]["session_options"]
    opts["intra_op_num_threads"], opts["inter_op_num_threads"] = threads, 1
    cfg["search"]["max_length"] = max_length
    cfg_path.write_text(json.dumps(cfg, indent=1))


class GenAI:
    def __init__(self, folder: Path, threads: int, prompt: list[int], new: int, adapter: str | None = None) -> None:
        import onnxruntime_genai as og

        genai_threads(folder, threads, len(prompt) + new)
        self.og, self.prompt, self.new = og, prompt, new
        self.model = og.Model(str(folder))
        self.adapters, self.adapter = None, adapter
        if adapter is not None:
            self.adapters = og.Adapters(self.model)
            for f in sorted(folder.glob("*.onnx_adapter")):
                self.adapters.load(str(f), f.stem)

    def generator(self, adapter: str | None = None):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(self.prompt) + self.new, do_sample=False)
        gen = self.og.Generator(self.model, params)
        if adapter or self.adapter:
            gen.set_active_adapter(self.adapters, adapter or self.adapter)
        return gen

    def run(self) -> tuple[list[int], float, float]:
        gen = self.generator()
        t0 = time.perf_counter()
        gen.append_tokens(self.prompt)
        gen.generate_next_token()
        out = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(out) < self.new:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return out, t1 - t0, (len(out) - 1) / (t2 - t1)


class Edgelora:
    def __init__(self, folder: Path, threads: int, prompt: list[int], new: int, mode: str, task: str | None) -> None:
        from edgelora.runtime import Runtime

        self.rt = Runtime.open(folder, threads=threads, mode=mode)
        self.prompt, self.new, self.task = prompt, new, task
        self.rt.activate(task)

    def run(self) -> tuple[list[int], float, float]:
        marks: list[float] = []
        t0 = time.perf_counter()
        out = self.rt.generate(self.prompt, self.new, stream=lambda _t: marks.append(time.perf_counter()))
        return out, marks[0] - t0, (len(out) - 1) / (marks[-1] - marks[0])


def torch_reference(base: Path, adapter: Path | None, prompt: list[int], new: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        model.generation_config.eos_token_id = None  # plain argmax for ``new`` tokens, as both systems run them
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------ measuring
def decode_table(systems: dict, rounds: int) -> dict:
    for s in systems.values():
        s.run()  # warm-up
    got: dict[str, list] = {k: [] for k in systems}
    tokens: dict[str, list[int]] = {}
    for _ in range(rounds):
        for k, s in systems.items():
            out, first, tps = s.run()
            got[k].append((first, tps))
            tokens[k] = out
    return {k: {"first_token_ms": float(np.median([g[0] for g in v]) * 1e3),
                "decode_tok_s": float(np.median([g[1] for g in v])), "tokens": tokens[k]} for k, v in got.items()}


def switch_times(genai_lora: GenAI, edge: dict, tasks: list[str], n: int = 40) -> dict:
    out = {}
    gen = genai_lora.generator(tasks[0])
    ms = []
    for i in range(n):
        t = time.perf_counter()
        gen.set_active_adapter(genai_lora.adapters, tasks[(i + 1) % len(tasks)])
        ms.append((time.perf_counter() - t) * 1e3)
    out["genai set_active_adapter"] = float(np.median(ms))
    for mode, sys_ in edge.items():
        rt = sys_.rt
        for t in tasks:  # each task built / opened once (an engines-mode first open is measured apart)
            rt.activate(t)
        ms = []
        for i in range(n):
            rt._forget_built()
            t = time.perf_counter()
            rt.activate(tasks[(i + 1) % len(tasks)])
            ms.append((time.perf_counter() - t) * 1e3)
        out[f"edgelora activate ({mode})"] = float(np.median(ms))
        rt.activate(sys_.task)
    return out


RSS_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
kind, folder, tasks, threads, prompt, new = {args!r}
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
t = time.perf_counter()
if kind == 'genai':
    import onnxruntime_genai as og
    model = og.Model(folder); adapters = og.Adapters(model)
    for name in tasks:
        adapters.load(str(Path(folder) / (name + '.onnx_adapter')), name)
    for name in tasks:
        p = og.GeneratorParams(model); p.set_search_options(max_length=len(prompt) + new, do_sample=False)
        g = og.Generator(model, p); g.set_active_adapter(adapters, name); g.append_tokens(prompt)
        for _ in range(new):
            g.generate_next_token()
        del g
else:
    from edgelora.runtime import Runtime
    rt = Runtime.open(folder, threads=threads, mode=kind.split(':')[1], max_resident=len(tasks) + 1)
    for name in tasks:
        rt.activate(name); rt.generate(prompt, new)
ready = time.perf_counter() - t
print(json.dumps({{'rss_mb': rss(), 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  'seconds': ready}}))
"""


def resident(kind: str, folder: Path, tasks: list[str], threads: int, prompt: list[int]) -> dict:
    code = RSS_SCRIPT.format(repo=str(HERE.parent), args=(kind, str(folder), tasks, threads, prompt, 4))
    done = subprocess.run([PY, "-c", code], env=ENV, capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def gemv_bound(weight_bytes: int, threads: int, hidden: int = 576, runs: int = 20) -> float:
    """Calls per second of one ONNX Runtime MatMul (1 × hidden) @ (hidden × n) over ``weight_bytes`` of fp32
    weights: what any fp32 graph that reads the model's weights once per token can reach on this CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = weight_bytes // (4 * hidden)
    w = np.random.default_rng(0).standard_normal((hidden, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del w, graph, model
    x = np.ones((1, hidden), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times))


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--tasks", type=int, default=8, help="adapters deployed (switch time, resident memory)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-vs-genai"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        import onnxruntime_genai as og  # noqa: F401
    except ImportError:
        sys.exit("the peer is not installed: pip install onnxruntime-genai (or 'edgelora[genai]')")
    args.work.mkdir(parents=True, exist_ok=True)
    base = make_w2_base(args.work / "w2-base")
    adapters = {f"t{s}": make_w2_adapter(base, args.work / f"w2-t{s}", seed=s) for s in range(1, args.tasks + 1)}
    names = list(adapters)
    prompt = prompt_ids(args.prompt)
    print("PyTorch + PEFT greedy references ...", flush=True)
    ref = {"base": torch_reference(base, None, prompt, args.tokens),
           "t1": torch_reference(base, adapters["t1"], prompt, args.tokens)}
    results: dict = {"cpu": cpu_line(), "workload": {"prompt": args.prompt, "new_tokens": args.tokens,
                                                      "threads": args.threads, "tasks": args.tasks}}
    for precision in args.precision:
        print(f"[{precision}] building: edgelora export, GenAI's builder + adapters ...", flush=True)
        edge_folder = args.work / f"edgelora-{precision}"
        edge_s = build_edgelora(base, adapters, precision, edge_folder)
        g_base, g_lora, genai_s = build_genai(base, adapters, precision, args.work)
        from edgelora.format.manifest import read_manifest

        manifest = read_manifest(edge_folder)
        modes = ["engines", *(["unmerged"] if manifest.lora_graph else []), *(["swap"] if manifest.swap else [])]
        systems = {"genai base": GenAI(g_base, args.threads, prompt, args.tokens),
                   "genai t1 (adapter active)": GenAI(g_lora, args.threads, prompt, args.tokens, "t1"),
                   "edgelora base": Edgelora(edge_folder, args.threads, prompt, args.tokens, "engines", None)}
        for mode in modes:
            systems[f"edgelora t1 ({mode})"] = Edgelora(edge_folder, args.threads, prompt, args.tokens, mode, "t1")
        print(f"[{precision}] decoding, {args.rounds} interleaved rounds ...", flush=True)
        table = decode_table(systems, args.rounds)
        for k, v in table.items():
            want = ref["t1"] if "t1" in k else ref["base"]
            v["torch_agreement"] = float(np.mean([a == b for a, b in zip(v.pop("tokens"), want, strict=True)]))
        edge_modes = {m: systems[f"edgelora t1 ({m})"] for m in modes}
        switch = switch_times(systems["genai t1 (adapter active)"], edge_modes, names[:2])
        del systems, edge_modes
        print(f"[{precision}] resident memory with {len(names)} tasks (a process each) ...", flush=True)
        rss = {"genai": resident("genai", g_lora, names, args.threads, prompt)}
        for mode in modes:
            rss[f"edgelora ({mode})"] = resident(f"edgelora:{mode}", edge_folder, names, args.threads, prompt)
        report = json.loads((edge_folder / "report.json").read_text())
        weight_bytes = int(folder_mb(g_base, "model.onnx*") * 1e6)  # the base graph's bytes (fp32: its weights)
        bound = gemv_bound(weight_bytes, args.threads) if precision == "fp32" else None
        results[precision] = {
            "decode": table, "switch_ms": switch, "resident": rss,
            "build_s": {"edgelora export": edge_s, "genai builder + adapters": genai_s},
            "size_mb": {"genai deployed (base graph + adapters)": folder_mb(g_lora),
                        "edgelora folder": folder_mb(edge_folder),
                        "edgelora task engine adds": folder_mb(edge_folder / "base", "task-*.onnx") / len(names)},
            "runtime_mode": report.get("runtime_mode"),
            "fp32_weight_stream_bound_tok_s": bound, "base_weight_mb": weight_bytes / 1e6,
            "export_failures": report.get("failures"), "export_exit": json.loads(
                (edge_folder / "bench-build.json").read_text())["exit"]}
        print_precision(precision, results[precision])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\nCPU {results['cpu']}")


def print_precision(precision: str, r: dict) -> None:
    d = r["decode"]
    peer = d["genai t1 (adapter active)"]
    print(f"\n{precision}: decode tokens/s (first-token ms), torch agreement; ratios vs GenAI with the adapter active")
    for k, v in d.items():
        ratio = "" if k.startswith("genai") else (f"  {v['decode_tok_s'] / peer['decode_tok_s']:.2f}x decode, "
                                                  f"{v['first_token_ms'] / peer['first_token_ms']:.2f}x first token")
        print(f"  {k:28s} {v['decode_tok_s']:7.1f} tok/s  ({v['first_token_ms']:6.1f} ms)  "
              f"agree {v['torch_agreement']:.2f}{ratio}")
    print("  switch (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["switch_ms"].items()))
    print("  resident memory: " + ", ".join(
        f"{k} {v.get('rss_mb', float('nan')):.0f} MB" if "error" not in v else f"{k} error {v['error']}"
        for k, v in r["resident"].items()))
    print("  build s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["build_s"].items()) + "; size MB: " +
          ", ".join(f"{k} {v:.1f}" for k, v in r["size_mb"].items()))
    if r.get("fp32_weight_stream_bound_tok_s"):
        print(f"  bound: one MatMul over the base's {r['base_weight_mb']:.0f} MB of fp32 weights runs "
              f"{r['fp32_weight_stream_bound_tok_s']:.1f} calls/s = the most any fp32 graph decodes here "
              f"({r['fp32_weight_stream_bound_tok_s'] / peer['decode_tok_s']:.2f}x GenAI with the adapter)")
    if r.get("runtime_mode"):
        print(f"  runtime default (export's choice): {r['runtime_mode']['mode']}: {r['runtime_mode']['why']}")
    if r["export_failures"]:
        print(f"  edgelora export exit {r['export_exit']}: {r['export_failures']}")


if __name__ == "__main__":
    main()
