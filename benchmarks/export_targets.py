"""Export acceptance, side by side in one run: zero added latency, int8 on W1, int4 on W2, export cost.

    python benchmarks/export_targets.py [--json out.json] [--work /tmp/edgelora-bench]

W1 (bundled all-MiniLM-L6-v2 + the example adapters, batch 1 × 128 tokens, 2 threads):
  - export to cpu-fp32 and cpu-int8 (wall time of each export, as `edgelora export` runs it),
  - SST-2 validation accuracy of the int8 engine and of PyTorch (--eval, the whole dev file),
  - latency, all interleaved in one process: fp32 base engine, fp32 baked task engines, the same
    graph with LoRA as branches fed A/B, PEFT unmerged in PyTorch, int8 base and task engines.
W2 (SmolLM2-135M architecture, seeded weights, LoRA r=16 on q,k,v,o; one decode step at context 128):
  - export to cpu-fp32 and cpu-int4; the same latency line-up; sizes; logits cosine vs PyTorch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import W1_ADAPTERS, make_w2_adapter, make_w2_base  # noqa: E402

SST2_DEV = HERE.parent.parent / "shared" / "data" / "sst2" / "dev.tsv"


def _export(base, adapters, target, out, evals=None):
    from edgelora.export import ExportFailed, export
    from edgelora.target import load_target

    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] export {out.name} ...", file=sys.stderr, flush=True)
    try:
        res = export(base, adapters, load_target(target), out, evals=evals, force=True, keep_failed=True)
        report = res.report
    except ExportFailed as exc:  # kept on disk; the failures are in the report and printed below
        print(f"  {exc}", file=sys.stderr)
        report = json.loads((out / "report.json").read_text())
    return report, time.perf_counter() - t0


def _line_up(fp32_dir: Path, quant_dir: Path, rounds: int) -> dict:
    """Every engine of both folders plus the unmerged alternatives, interleaved in one process."""
    from edgelora.converters.onnx.lora import branch_feeds
    from edgelora.converters.onnx.names import WeightLocation

    from edgelora.bench import interleaved
    from edgelora.format.delta import read_delta
    from edgelora.format.layout import read_manifest_json as read_manifest
    from edgelora.latency import latency_inputs
    from edgelora.verify import session

    fns = {}
    for tag, folder in (("fp32", fp32_dir), ("quant", quant_dir)):
        m = read_manifest(folder)
        shapes = m["target"]["shapes"]
        vocab = m["base"]["vocab_size"]
        sess = session(folder / m["base"]["engine"], threads=2)
        feeds = latency_inputs(sess, m["base"]["io"], shapes["batch"], shapes["sequence"], vocab)
        fns[f"{tag} base"] = (lambda s=sess, f=feeds: s.run(None, f))
        for name, entry in m["tasks"].items():
            s2 = session(folder / entry["engine"], threads=2)
            f2 = latency_inputs(s2, entry["engine_io"], shapes["batch"], shapes["sequence"], vocab)
            fns[f"{tag} {name}"] = (lambda s=s2, f=f2: s.run(None, f))
        if tag == "fp32":
            lg = m["lora_graph"]
            ls = session(folder / lg["engine"], threads=2)
            locs = {k: WeightLocation.from_json(v) for k, v in lg["modules"].items()}
            inputs = {k: tuple(v) for k, v in lg["inputs"].items()}
            for name, entry in m["tasks"].items():
                modules, _ = read_delta(folder / entry["delta"])
                f3 = {**feeds, **branch_feeds(modules, inputs, locs)}
                fns[f"fp32 {name} (LoRA branches)"] = (lambda s=ls, f=f3: s.run(None, f))
            from edgelora.bench import _peft_unmerged

            name = next(iter(m["tasks"]))
            model = _peft_unmerged(m, name, 2)
            import torch

            ids = torch.from_numpy(feeds["input_ids"])
            if m["task"] == "causal-lm":
                with torch.no_grad():
                    cache = model(input_ids=torch.randint(5, vocab, (1, shapes["sequence"] - 1)),
                                  use_cache=True).past_key_values

                def peft_step(m_=model, c=cache, i=ids):
                    with torch.no_grad():
                        m_(input_ids=i, past_key_values=c, use_cache=True)
                    c.crop(-1)
            else:
                mask = torch.ones_like(ids)

                def peft_step(m_=model, i=ids, k=mask):
                    with torch.no_grad():
                        m_(input_ids=i, attention_mask=k)
            fns[f"fp32 {name} (PEFT unmerged, PyTorch)"] = peft_step
    return interleaved(fns, rounds=rounds, per_round=10)


def _latency_lines(lat: dict, tasks: tuple[str, ...]) -> list[str]:
    """Every median, then the zero-added-latency ratios and the unmerged alternatives."""
    b = lat["fp32 base"]["median_ms"]
    lines = [f"  {k:42s} {v['median_ms']:8.2f} ms  {v['median_ms'] / b:6.3f}x fp32 base" for k, v in lat.items()]
    for task in tasks:
        baked = lat[f"fp32 {task}"]["median_ms"]
        lines.append(f"  zero added latency {task}: baked/base {baked / b:.3f} (goal <= 1.01); LoRA branches "
                     f"{lat[f'fp32 {task} (LoRA branches)']['median_ms'] / baked:.2f}x baked")
    peft_key = next(k for k in lat if "PEFT" in k)
    lines.append(f"  PEFT unmerged (PyTorch) / baked fp32: "
                 f"{lat[peft_key]['median_ms'] / lat['fp32 ' + peft_key.split()[1]]['median_ms']:.2f}x")
    return lines


def _sizes(folder: Path) -> dict:
    from edgelora.export import engine_size
    from edgelora.format.layout import read_manifest_json as read_manifest

    m = read_manifest(folder)  # with the external data of the base engine (format 2)
    return {"base": engine_size(folder / m["base"]["engine"]),
            **{n: engine_size(folder / e["engine"]) for n, e in m["tasks"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgelora-bench"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=["w1", "w2"], default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    lines: list[str] = []

    if args.only in (None, "w1"):
        w1 = {k: str(v) for k, v in W1_ADAPTERS.items()}
        evals = {"sst2": str(SST2_DEV)} if SST2_DEV.is_file() else {}
        rep32, t32 = _export(None, w1, "cpu-fp32", args.work / "w1-fp32")
        rep8, t8 = _export(None, w1, "cpu-int8", args.work / "w1-int8", evals)
        rep8_noeval, t8_noeval = _export(None, w1, "cpu-int8", args.work / "w1-int8-noeval")
        shutil.rmtree(args.work / "w1-int8-noeval", ignore_errors=True)
        lat = _line_up(args.work / "w1-fp32", args.work / "w1-int8", args.rounds)
        s32, s8 = _sizes(args.work / "w1-fp32"), _sizes(args.work / "w1-int8")
        b = lat["fp32 base"]["median_ms"]
        sst2 = rep8["tasks"]["sst2"]
        results["w1"] = {"latency": lat, "sizes_fp32": s32, "sizes_int8": s8, "export_s": {
            "cpu-fp32": t32, "cpu-int8": t8_noeval, "cpu-int8 with --eval sst2 dev": t8},
            "int8_sst2_accuracy": sst2["accuracy"], "torch_sst2_accuracy": sst2["torch_accuracy"],
            "reports": {"cpu-fp32": rep32, "cpu-int8": rep8}}
        lines += [f"W1 all-MiniLM-L6-v2, batch 1 x 128 tokens, 2 threads, {args.rounds * 10} interleaved runs each"]
        lines += _latency_lines(lat, ("sst2", "agnews"))
        q8 = lat["quant base"]["median_ms"]
        lines.append(f"  int8 speed-up vs fused fp32 (base engines): {b / q8:.2f}x (goal >= 1.5); "
                     f"sst2 engines {lat['fp32 sst2']['median_ms'] / lat['quant sst2']['median_ms']:.2f}x")
        lines.append(f"  int8 size: {s8['base'] / 1e6:.1f} MB vs {s32['base'] / 1e6:.1f} MB = "
                     f"{s8['base'] / s32['base']:.3f}x (goal <= 0.3)")
        if sst2["accuracy"] is not None:
            lines.append(f"  SST-2 dev accuracy: int8 engine {sst2['accuracy']:.2%}, "
                         f"PyTorch {sst2['torch_accuracy']:.2%} "
                         f"({(sst2['accuracy'] - sst2['torch_accuracy']) * 100:+.2f} points, goal within 0.5)")
        lines.append(f"  export wall: cpu-fp32 {t32:.1f} s, cpu-int8 {t8_noeval:.1f} s (goal <= 60 s), "
                     f"cpu-int8 + accuracy on the 6,735-sentence dev file {t8:.1f} s")

    if args.only in (None, "w2"):
        base = make_w2_base(args.work / "w2-base")
        ads = {f"t{i}": str(make_w2_adapter(base, args.work / f"w2-t{i}", i)) for i in (1, 2)}
        rep32, t32 = _export(str(base), ads, "cpu-fp32", args.work / "w2-fp32")
        rep4, t4 = _export(str(base), ads, "cpu-int4", args.work / "w2-int4")
        lat = _line_up(args.work / "w2-fp32", args.work / "w2-int4", args.rounds)
        s32, s4 = _sizes(args.work / "w2-fp32"), _sizes(args.work / "w2-int4")
        b = lat["fp32 base"]["median_ms"]
        results["w2"] = {"latency": lat, "sizes_fp32": s32, "sizes_int4": s4, "export_s": {"cpu-fp32": t32,
                                                                                          "cpu-int4": t4},
                         "reports": {"cpu-fp32": rep32, "cpu-int4": rep4}}
        lines += ["W2 SmolLM2-135M architecture (seeded), LoRA r=16 q,k,v,o; one decode step at context 128, "
                  "2 threads"]
        lines += _latency_lines(lat, ("t1", "t2"))
        lines.append(f"  int4 decode speed-up vs fp32 (base): {b / lat['quant base']['median_ms']:.2f}x (goal >= 1.3)")
        lines.append(f"  int4 size: {s4['base'] / 1e6:.1f} MB vs {s32['base'] / 1e6:.1f} MB = "
                     f"{s4['base'] / s32['base']:.3f}x (goal <= 0.2)")
        lines.append("  int4 logits cosine vs PyTorch: " + ", ".join(
            f"{n} {t['cosine']:.4f}" for n, t in rep4["tasks"].items()) + f" (base {rep4['base']['cosine']:.4f}; "
            "goal >= 0.99)")
        lines.append(f"  export wall: cpu-fp32 {t32:.1f} s, cpu-int4 {t4:.1f} s")

    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "reports"} for k, v in results.items()},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
