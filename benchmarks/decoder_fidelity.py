"""Decoder fidelity of edgelora's exported engines (int4 first) against PyTorch fp32, on a *trained* model.

What it measures, per target (default: cpu-fp32 as the reference and sanity check, then cpu-int4):

1. ``edgelora export --base MODEL --target T -o WORK/T --force --keep-failed -q --json`` on the small
   Llama-shaped decoder that ``train_small_llama.py`` trains on AG News (built first if ``--model`` has
   no ``config.json``). Export takes tasks, so it gets one zero adapter (PEFT LoRA r=4 on q_proj/v_proj
   with PEFT's default init, B = 0): the merged model is the base itself. The export's exit status and
   its report's failure lines are recorded (it exits 1 when an engine misses the target's tolerance;
   ``--keep-failed`` still writes the folder).
2. The written base engine ``WORK/T/base/model.onnx`` in ONNX Runtime (CPU, 2 intra-op threads) on the
   first ``--texts`` held-out AG News texts (the rows the model never trained on), each tokenized
   (``<s>`` + text) and truncated to 128 tokens, the whole sequence in one call with an empty KV cache
   (``past_key_values.{i}.key/value`` of shape (1, kv_heads, 0, head_dim): the engine's documented prefill,
   as in ``edgelora.verify.empty_cache``), against ``LlamaForCausalLM`` in fp32 on the same ids.
3. At every position: the cosine of the two logit vectors (over the vocabulary) and whether their argmax
   (the next token) agrees. Reported over all positions of all texts: mean and min cosine, the worst
   sequence's mean cosine, next-token agreement, max |Δ logit|.
4. Engine size: ``model.onnx`` plus the external-data bytes it references, against the cpu-fp32 engine's.

The acceptance held for int4: logits cosine ≥ 0.99, next-token agreement ≥ 0.9, size ≤ 0.2x fp32
(cpu-fp32 itself should give cosine ≥ 0.99999 and agreement 1.0). This script only measures.

Result (2026-11-30, AMD EPYC, 2 cores, avx512_vnni, no AMX; the model of ``train_small_llama.py``'s 6-minute
default, held-out loss 4.75; 64 texts, 3,474 positions)::

    target    cos mean   cos min  worst seq  next-token agree   max |Δ|  engine MB  vs fp32  export rc
    cpu-fp32  1.000000  1.000000   1.000000            1.0000  1.81e-05      32.91   1.000x          0
    cpu-int4  0.999969  0.998959   0.999941            0.9847     0.567       6.94   0.211x          0

int4 passes cosine and agreement and misses the size bound (0.211x > 0.2x): of its 6.94 MB, the 4-bit
gate/up weights are 2.36 MB (blocks of 16 with fp32 scales: 6 bits a weight), the 8-bit down projections
1.60 MB, attention 1.33 MB, the tied 8-bit LM head / embedding 1.07 MB, the graph 0.56 MB. The fp32
engine (32.91 MB) stores the tied embedding twice (1.16x the model's 28.33 MB of fp32 parameters).

Run (from the repository root; one heavy process at a time on a shared machine)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_fidelity.py --json /tmp/decoder_fidelity.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_fidelity.py --model /tmp/edgelora-small-llama \\
        --target cpu-int4 --target cpu-int8 --work /tmp/edgelora-fidelity --texts 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft deprecation chatter

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from train_small_llama import DEFAULT_OUT, build_small_llama, load_agnews_split  # noqa: E402

EDGELORA = REPO / ".venv" / "bin" / "edgelora"
MAX_TOKENS = 128
THREADS = 2
REFERENCE = "cpu-fp32"
ACCEPT = {t: {"cosine": 0.99, "agreement": 0.9, "size_vs_fp32": 0.2} for t in ("cpu-int4", "cpu-int4-gqa")}


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------


def cpu_line() -> tuple[str, dict]:
    """The CPU model and the SIMD flags that decide int4/int8 kernels, from /proc/cpuinfo."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    amx = sorted(f for f in flags if f.startswith("amx"))
    info = {"model": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "amx": amx}
    yn = {True: "yes", False: "no"}
    line = (f"CPU {name} ({info['cores']} cores): avx2 {yn[info['avx2']]}, avx512f {yn[info['avx512f']]}, "
            f"avx512_vnni {yn[info['avx512_vnni']]}, amx {' '.join(amx) if amx else 'no'}")
    return line, info


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def zero_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT LoRA adapter (r=4 on q_proj, v_proj) with PEFT's default init: B = 0, so merged == base."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM", init_lora_weights=True))
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(out)
    return out


def export(model_dir: Path, adapter: Path, target: str, out: Path) -> dict:
    """Run the project's CLI; the exit status, seconds, report failures and the report's base numbers."""
    cmd = [str(EDGELORA), "export", "--base", str(model_dir), "--adapter", f"zero={adapter}", "--target", target,
           "-o", str(out), "--force", "--keep-failed", "-q", "--json", "--threads", str(THREADS)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    report: dict = {}
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        if (out / "report.json").exists():
            report = json.loads((out / "report.json").read_text())
    result = {"command": cmd, "exit_status": proc.returncode, "seconds": round(seconds, 1),
              "failures": report.get("failures", []), "report_base": report.get("base", {})}
    if proc.returncode != 0:
        stderr = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        result["stderr_tail"] = stderr[-5:]
        print(f"  export exit status {proc.returncode}: " + ("; ".join(map(str, result["failures"]))
                                                            or " | ".join(stderr[-3:])), flush=True)
    return result


def engine_bytes(engine: Path) -> dict:
    """The graph file plus the external-data byte ranges its initializers reference (each range once)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(engine), load_external_data=False)
    ranges, files = set(), set()
    for init in proto.graph.initializer:
        if uses_external_data(init):
            info = {e.key: e.value for e in init.external_data}
            ranges.add((info["location"], int(info.get("offset", 0)), int(info.get("length", 0))))
            files.add(info["location"])
    graph = engine.stat().st_size
    data = sum(r[2] for r in ranges)
    return {"bytes": graph + data, "graph_bytes": graph, "external_bytes": data,
            "external_files": {f: (engine.parent / f).stat().st_size for f in sorted(files)}}


# --------------------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------------------


def token_ids(model_dir: Path, texts: list[str]) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [np.asarray(tok(t, truncation=True, max_length=MAX_TOKENS)["input_ids"], dtype=np.int64)[None]
            for t in texts]


def torch_logits(model_dir: Path, ids: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch fp32 reference logits, (seq, vocab) per text."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.from_numpy(x)).logits[0].float().numpy() for x in ids]


def engine_logits(engine: Path, ids: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The engine's logits for each whole sequence, prefilled with an empty (zero-length) KV cache."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(engine), so, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    io = json.loads((engine.parent.parent / "manifest.json").read_text())["base"]["io"]  # symbolic in some graphs
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):  # (batch, kv_heads, past_sequence, head_dim)
            past[i.name] = np.zeros((1, io["num_kv_heads"], 0, io["head_dim"]), dtype=dtypes[i.type])
    feeds_note = f"empty past: {len(past)} inputs of shape {next(iter(past.values())).shape}" if past else "no past"
    out = []
    for x in ids:
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), **past}
        out.append(sess.run(["logits"], feeds)[0][0].astype(np.float32))
    return out, feeds_note


def decode_speed(folders: dict[str, Path], ids: list[np.ndarray], rounds: int = 5) -> dict[str, float]:
    """Greedy decode rate of each folder's base engine through the runtime (the traced graphs' concatenated cache
    or the builder graphs' shared one), interleaved so every target sees the same machine."""
    import time

    from edgelora.runtime import Runtime

    prompt = next(x for x in ids if x.shape[1] >= 64)[0, :64].tolist()
    rts = {t: Runtime.open(f, threads=THREADS, mode="engines") for t, f in folders.items()}
    rates: dict[str, list[float]] = {t: [] for t in rts}
    for _ in range(rounds + 1):  # the first round warms up
        for t, rt in rts.items():
            marks: list[float] = []
            rt.generate(prompt, 64, stream=lambda _tok, m=marks: m.append(time.perf_counter()))
            rates[t].append((len(marks) - 1) / (marks[-1] - marks[0]))
    return {t: float(np.median(v[1:])) for t, v in rates.items()}


def compare(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Per-position logits cosine (over the vocabulary) and argmax agreement, over all texts."""
    cos_all, agree_all, seq_means, seq_mins, max_abs = [], [], [], [], 0.0
    for g, r in zip(got, ref, strict=True):
        g64, r64 = g.astype(np.float64), r.astype(np.float64)
        cos = (g64 * r64).sum(-1) / (np.linalg.norm(g64, axis=-1) * np.linalg.norm(r64, axis=-1))
        cos_all.append(cos)
        agree_all.append(g.argmax(-1) == r.argmax(-1))
        seq_means.append(float(cos.mean()))
        seq_mins.append(float(cos.min()))
        max_abs = max(max_abs, float(np.abs(g64 - r64).max()))
    cos_all, agree_all = np.concatenate(cos_all), np.concatenate(agree_all)
    return {"positions": int(cos_all.size), "cosine_mean": float(cos_all.mean()), "cosine_min": float(cos_all.min()),
            "worst_sequence_mean_cosine": float(min(seq_means)), "mean_sequence_min_cosine": float(np.mean(seq_mins)),
            "agreement": float(agree_all.mean()), "max_abs_diff": max_abs}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = ["target", "cos mean", "cos min", "worst seq", "next-token agree", "max |Δ|", "engine MB", "vs fp32",
            "export rc"]
    lines = [head]
    for r in rows:
        f = r.get("fidelity", {})
        ratio = r.get("size_vs_fp32")
        lines.append([r["target"],
                      f"{f['cosine_mean']:.6f}" if f else "-", f"{f['cosine_min']:.6f}" if f else "-",
                      f"{f['worst_sequence_mean_cosine']:.6f}" if f else "-",
                      f"{f['agreement']:.4f}" if f else "-", f"{f['max_abs_diff']:.3g}" if f else "-",
                      f"{r['size']['bytes'] / 1e6:.2f}" if "size" in r else "-",
                      f"{ratio:.3f}x" if ratio is not None else "-", str(r["export"]["exit_status"])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join(fmt(row) for row in lines)


def acceptance(row: dict) -> list[str]:
    """'name value vs bound: PASS/FAIL' lines for a target with an acceptance bar."""
    bar = ACCEPT.get(row["target"])
    if not bar or "fidelity" not in row:
        return []
    f, ratio = row["fidelity"], row.get("size_vs_fp32")
    checks = [("logits cosine mean", f["cosine_mean"], ">=", bar["cosine"]),
              ("next-token agreement", f["agreement"], ">=", bar["agreement"]),
              ("size vs fp32", ratio, "<=", bar["size_vs_fp32"])]
    out = []
    for name, value, op, bound in checks:
        ok = value is not None and (value >= bound if op == ">=" else value <= bound)
        shown = "n/a" if value is None else f"{value:.6f}" if "cosine" in name else f"{value:.4f}"
        out.append(f"{row['target']}: {name} {shown} (goal {op} {bound:g}): {'PASS' if ok else 'FAIL'}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help=f"trained model folder (default {DEFAULT_OUT})")
    ap.add_argument("--target", action="append", default=None,
                    help="target to measure (repeat; default cpu-int4). cpu-fp32 is always exported, first.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-fidelity"), help="export folders")
    ap.add_argument("--texts", type=int, default=64, help="held-out AG News texts to compare on (default 64)")
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget if the model must be built")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--speed", action="store_true",
                    help="also time each target's base decode (edgelora.runtime generate, interleaved rounds)")
    args = ap.parse_args(argv)

    cpu, cpu_info = cpu_line()
    print(cpu, flush=True)
    model_dir = build_small_llama(args.model, minutes=args.minutes)
    train_report = json.loads((model_dir / "train_report.json").read_text()) \
        if (model_dir / "train_report.json").exists() else {}
    targets = [REFERENCE] + [t for t in (args.target or ["cpu-int4"]) if t != REFERENCE]
    args.work.mkdir(parents=True, exist_ok=True)
    adapter = zero_adapter(model_dir, args.work / "zero-adapter")

    _, held_out = load_agnews_split()
    texts = held_out[:args.texts]
    ids = token_ids(model_dir, texts)
    print(f"{len(texts)} held-out AG News texts, {sum(x.shape[1] for x in ids)} positions "
          f"(<s> + text, at most {MAX_TOKENS} tokens); PyTorch fp32 reference ...", flush=True)
    ref = torch_logits(model_dir, ids)

    rows = []
    for target in targets:
        out = args.work / (Path(target).stem if target.endswith(".toml") else target)  # a bundled name or a file
        row: dict = {"target": target, "export": export(model_dir, adapter, target, out)}
        engine = out / "base" / "model.onnx"
        if engine.exists():
            row["size"] = engine_bytes(engine)
            got, row["feeds"] = engine_logits(engine, ids)
            row["fidelity"] = compare(got, ref)
        else:
            row["error"] = f"{engine} was not written"
            print(f"  {row['error']}", flush=True)
        rows.append(row)
    fp32 = next((r for r in rows if r["target"] == REFERENCE and "size" in r), None)
    param_bytes = 4 * train_report.get("parameters", 0)  # the model's own fp32 weights (tied embedding once)
    for r in rows:
        r["size_vs_fp32"] = r["size"]["bytes"] / fp32["size"]["bytes"] if fp32 and "size" in r else None
        r["size_vs_fp32_parameters"] = r["size"]["bytes"] / param_bytes if param_bytes and "size" in r else None

    print()
    print(cpu)
    print(f"model: {model_dir} (LlamaForCausalLM {train_report.get('parameters', 0) / 1e6:.2f}M parameters, "
          f"held-out loss {train_report.get('held_out_loss', float('nan')):.3f}); {len(texts)} held-out texts, "
          f"{rows[0].get('fidelity', {}).get('positions', 0)} positions; ONNX Runtime {THREADS} threads vs "
          f"PyTorch fp32")
    print(table(rows))
    if param_bytes and fp32:
        print(f"(vs fp32: the cpu-fp32 engine's bytes; the model's fp32 parameters are {param_bytes / 1e6:.2f} MB, "
              f"the engine {fp32['size']['bytes'] / param_bytes:.3f}x that)")
    if args.speed:
        speeds = decode_speed({r["target"]: args.work / (Path(r["target"]).stem if r["target"].endswith(".toml")
                                                         else r["target"]) for r in rows if "size" in r}, ids)
        print("decode tokens/s of the base engine (edgelora.runtime generate: 64-token prompt, 64 new, median of "
              "5 interleaved rounds): " + ", ".join(f"{t} {v:.0f}" for t, v in speeds.items()))
        for r in rows:
            r["decode_tokens_per_s"] = speeds.get(r["target"])
    for r in rows:
        for line in acceptance(r):
            print(line)
        for failure in r["export"]["failures"]:
            print(f"{r['target']}: export failure: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_info, "model": str(model_dir), "train_report": train_report,
                                         "texts": len(texts), "max_tokens": MAX_TOKENS, "threads": THREADS,
                                         "acceptance": ACCEPT, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
