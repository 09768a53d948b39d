"""Calibrated static int8 (QDQ, ``cpu-int8-qdq``): the sensitivity pass, the engines and the runtime's swap on a QDQ
base, checked on W1 (the bundled MiniLM and the example adapters) against PyTorch; and every bad ``--calibrate``
input as one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error

from edgelora.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
ADAPTERS = [f"sst2={EXAMPLES / 'adapters/sst2'}", f"agnews={EXAMPLES / 'adapters/agnews'}"]


_one_line = assert_one_line_error


def _adapters():
    return [a for pair in ADAPTERS for a in ("--adapter", pair)]


@pytest.mark.parametrize("case", ["missing", "empty", "columns", "unknown-task", "not-static", "one-row"])
def test_bad_calibration_input_is_one_line_and_writes_nothing(case, tmp_path, cli):
    out = tmp_path / "o"
    target = "cpu-int8-qdq"
    files = {"empty": "sentence\tlabel\n", "columns": "review\tstars\nfine\t5\nbad\t1\n", "one-row": "only one\n"}
    cal = tmp_path / ("cal.txt" if case == "one-row" else "cal.tsv")
    if case in files:
        cal.write_text(files[case])
    args = {"missing": [], "empty": ["--calibrate", cal], "columns": ["--calibrate", cal],
            "unknown-task": ["--calibrate", f"nosuch={EXAMPLES / 'data/sst2-dev-500.tsv'}"],
            "not-static": ["--calibrate", EXAMPLES / "data/sst2-dev-500.tsv"], "one-row": ["--calibrate", cal]}[case]
    if case == "not-static":
        target = "cpu-int8"
    res = cli("export", *_adapters(), "--target", target, "-o", out, "-q", *args)
    needle = {"missing": "--calibrate sst2=FILE", "empty": "has 0 text", "columns": "no 'sentence' or 'text' column",
              "unknown-task": "no adapter named 'nosuch'", "not-static": "is not calibrated",
              "one-row": "has 1 text"}[case]
    _one_line(res, needle)
    assert not out.exists() and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_target_fields_are_checked(tmp_path, cli):
    bundled = (REPO / "targets" / "cpu-int8-qdq.toml").read_text()
    for old, new, needle in (('calibration = "minmax"', 'calibration = "average"', "choose minmax"),
                             ("optimize = false", "optimize = true", "set optimize = false"),
                             ("sensitivity_agreement = 0.99", "sensitivity_agreement = 1.5", "in (0, 1]")):
        target = tmp_path / "t.toml"
        target.write_text(bundled.replace(old, new))
        res = cli("export", *_adapters(), "--target", target, "-o", tmp_path / "o", "-q",
                  "--calibrate", EXAMPLES / "data/sst2-dev-500.tsv")
        _one_line(res, needle)


@pytest.mark.slow
def test_static_int8_w1_engines_runtime_and_sensitivity(tmp_path, cli):
    """A small calibration (64 texts per task, 64 held out) so the test stays near a minute: the report names
    the per-node errors and trials, the task engines agree with PyTorch on held-out text, and the runtime's swap
    on the QDQ base rebuilds each task's int8 weights bit for bit (same logits as the baked engine)."""
    target = tmp_path / "qdq.toml"  # the phone's QDQ target: static int8 and its ORT-format models
    target.write_text((REPO / "targets" / "mobile-int8-qdq.toml").read_text()
                      .replace("calibration_samples = 256", "calibration_samples = 64")
                      .replace("check_samples = 256", "check_samples = 64")
                      .replace("sensitivity_max_float = 12", "sensitivity_max_float = 2"))
    out = tmp_path / "o"
    res = cli("export", *_adapters(), "--target", target, "-o", out, "-q", "--keep-failed",
              "--calibrate", f"sst2={EXAMPLES / 'data/sst2-dev-500.tsv'}",
              "--calibrate", f"agnews={EXAMPLES / 'data/agnews-val-500.tsv'}")
    assert res.code in (0, 1), res.err
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["method"] == "static" and q["format"] == "QDQ" and q["calibration"] == "minmax"
    assert len(q["node_errors"]) >= 30 and all(v >= 0 for v in q["node_errors"].values())
    ranked = list(q["node_errors"].values())
    assert ranked == sorted(ranked, reverse=True) and ranked[0] > 0
    assert 1 <= len(q["trials"]) <= 3 and q["kept_float"] == list(q["node_errors"])[:len(q["trials"]) - 1]
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / "base" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, not the dynamic form
    assert "DynamicQuantizeLinear" not in ops
    # every weighted MatMul reads int8 weights: the kept ones too (weight-only), their activations float
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in producers and producers[node.input[1]].op_type == \
                "DequantizeLinear":
            assert numpy_helper.to_array(inits[producers[node.input[1]].input[0]]).dtype == np.int8
    kept = [n for n in model.graph.node if n.name in q["kept_float"]]
    assert len(kept) == len(q["kept_float"])
    for node in kept:
        assert producers[node.input[1]].op_type == "DequantizeLinear"  # int8 weight
        assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type != "DequantizeLinear"
    assert (out / "mobile").is_dir() and any(p.suffix == ".ort" for p in (out / "mobile").iterdir())
    for name, task in report["tasks"].items():
        # 64 calibration texts and at most 2 kept MatMuls make a coarse engine (measured: 7 or 8 of the 8 check texts
        # decided as PyTorch does); the full recipe's accuracy is benchmarks/int8_accuracy.py's
        assert task["cosine"] >= 0.98 and task["agreement"] >= 0.75, (name, task)
        assert task["bake"] == "patched"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {w["recipe"] for w in manifest["swap"]["weights"].values()} == {"int8-pairsafe"}
    rt = Runtime.open(out, threads=1)
    assert rt.mode == "swap"
    ids = np.array([[101, 2023, 3185, 2001, 6429, 1998, 2200, 6057, 102]], np.int64)
    for name in ("sst2", "agnews", "sst2"):
        rt.activate(name)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out / manifest["tasks"][name]["engine"]), providers=["CPUExecutionProvider"])
        baked = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        assert np.abs(rt.run(input_ids=ids)["logits"] - baked).max() <= 1e-4
