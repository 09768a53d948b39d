"""ONNX Runtime Mobile targets (mobile-fp32, mobile-int8): ORT-format models beside the ONNX engines, the operator
config of a minimal build, the runtime on the .ort models, the device providers, and one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_labelled_adapters, schema_validator, tree

from edgelora.errors import EdgeloraError
from edgelora.format.manifest import parse_manifest, read_manifest
from edgelora.runtime import Runtime
from edgelora.target import load_target

CPU = ["CPUExecutionProvider"]
TARGETS = ("mobile-fp32", "mobile-int8")


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    base = tiny_dir("bert")
    return base, make_labelled_adapters(base, tmp_path_factory.mktemp("mobile_ads"),
                                        {"mood": ["negative", "positive"], "topic": ["world", "sports", "tech"]})


@pytest.fixture(scope="module")
def folders(adapters, tmp_path_factory):
    """target -> a tiny BERT deployment folder with two tasks, exported through the CLI."""
    from edgelora.cli import main

    base, ads = adapters
    out = {}
    for target in TARGETS:
        dst = tmp_path_factory.mktemp(target) / "out"
        args = ["export", "--base", base, "--target", target, "-o", dst, "-q"]
        for name, path in ads.items():
            args += ["--adapter", f"{name}={path}"]
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code in (0, None), f"export {target} failed"
        out[target] = dst
    return out


def _ids(vocab: int, rows: int = 2, seq: int = 9) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(5).integers(3, vocab, (rows, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _feeds(sess: ort.InferenceSession, vocab: int) -> dict[str, np.ndarray]:
    """The same feeds for a model and its .ort: ids, and seeded values for fed weights (static shapes)."""
    feeds, rng = dict(_ids(vocab)), np.random.default_rng(0)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for i in sess.get_inputs():
        if i.name in feeds or not all(isinstance(d, int) for d in i.shape):
            continue
        if i.type == "tensor(int8)":
            feeds[i.name] = rng.integers(-127, 128, i.shape).astype(np.int8)
        else:
            feeds[i.name] = (np.abs(rng.standard_normal(i.shape)) * 1e-3 if i.name.endswith("_scale")
                             else rng.standard_normal(i.shape) * 0.05).astype(np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("target", TARGETS)
def test_a_mobile_folder_carries_ort_models_the_operator_config_and_a_valid_manifest(folders, target):
    folder = folders[target]
    m = read_manifest(folder)
    assert m.mobile is not None and m.mobile.onnxruntime == ort.__version__
    mobile = m.mobile
    assert (mobile.optimization_level, mobile.optimization_style, mobile.target_platform) == ("all", "fixed", "arm")
    # the runtime's swap graph, the base engine and each baked task engine; no branch graph unless asked
    assert set(m.mobile.engines) == {"base/model.onnx", "base/swap.onnx", "base/task-mood.onnx", "base/task-topic.onnx"}
    assert m.mobile.engines["base/swap.onnx"] == "mobile/swap.ort"
    for ort_rel in [*m.mobile.engines.values(), m.mobile.operators]:
        assert ort_rel in m.files and (folder / ort_rel).stat().st_size == m.files[ort_rel].size
    # the phone ships no .onnx.data: every W0 the swap rebuilds from is in base/swap_w0.safetensors
    assert m.swap is not None and m.swap.w0 == "base/swap_w0.safetensors"
    assert all(w.source is None for w in m.swap.weights.values())
    # the target's device providers, in its order, under ONNX Runtime's names and options
    assert [p.name for p in m.mobile.providers] == ["XnnpackExecutionProvider", "NnapiExecutionProvider",
                                                    "CoreMLExecutionProvider", "QNNExecutionProvider"]
    assert m.mobile.providers[0].options == {"intra_op_num_threads": "2"}
    assert m.mobile.providers[1].options == {"NNAPI_FLAG_CPU_DISABLED": "1"}
    raw = json.loads((folder / "manifest.json").read_text())
    assert not list(schema_validator().iter_errors(raw))
    assert parse_manifest(m.to_json()) == m
    report = json.loads((folder / "report.json").read_text())
    assert all(row["max_abs_diff"] == 0.0 for row in report["mobile"]["engines"].values())


@pytest.mark.parametrize("target", TARGETS)
def test_every_ort_model_loads_and_matches_its_onnx_exactly(folders, target):
    folder = folders[target]
    m = read_manifest(folder)
    for rel, ort_rel in m.mobile.engines.items():
        onnx_sess = ort.InferenceSession(str(folder / rel), providers=CPU)
        ort_sess = ort.InferenceSession(str(folder / ort_rel), providers=CPU)
        assert [i.name for i in ort_sess.get_inputs()] == [i.name for i in onnx_sess.get_inputs()]
        feeds = _feeds(onnx_sess, m.base.vocab_size)
        for a, b in zip(onnx_sess.run(None, feeds), ort_sess.run(None, feeds), strict=True):
            assert np.array_equal(a, b), f"{ort_rel} differs from {rel}"


def _config_entries(path: Path) -> set[tuple[str, int, str]]:
    out = set()
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, opset, ops = line.split(";")
            out |= {(domain, int(opset), op) for op in ops.split(",")}
    return out


def _operators_used(onnx_path: Path, work: Path, level: ort.GraphOptimizationLevel) -> set[tuple[str, int, str]]:
    """(domain, opset, op type) of every node of ONNX Runtime's optimized graph of ``onnx_path`` at ``level``
    (saved as ONNX, read with onnx): the opset is the version of the operator's schema the model's import selects,
    as a minimal build registers kernels."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(work / "optimized.onnx")
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    ort.InferenceSession(str(onnx_path), so, providers=CPU, disabled_optimizers=["NchwcTransformer"])
    model = onnx.load(str(work / "optimized.onnx"), load_external_data=False)
    imports = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    used = set()
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        if domain == "ai.onnx":
            version = onnx.defs.get_schema(node.op_type, imports[domain], "").since_version
        else:  # ONNX Runtime's contrib operators: not in onnx.defs; each is at the domain's version (1)
            version = imports[domain]
        used.add((domain, version, node.op_type))
    return used


@pytest.mark.parametrize("target", TARGETS)
def test_required_operators_config_lists_exactly_the_operators_the_models_use(folders, target, tmp_path):
    folder = folders[target]
    m = read_manifest(folder)
    used: set[tuple[str, int, str]] = set()
    for rel in m.mobile.engines:
        used |= _operators_used(folder / rel, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert _config_entries(folder / m.mobile.operators) == used
    assert ("ai.onnx", 17, "LayerNormalization") in used  # sanity: the computation sees the graph
    text = (folder / m.mobile.operators).read_text()
    assert str(folder) not in text and "# - mobile/swap.ort" in text  # no path of the exporting machine


# ---------------------------------------------------------------------------------------------- the runtime
@pytest.mark.parametrize("target", TARGETS)
def test_the_runtime_swaps_tasks_on_the_ort_swap_graph_like_the_baked_engines(folders, target):
    folder = folders[target]
    m = read_manifest(folder)
    rt = Runtime.open(folder, threads=1)
    assert (rt.engine_format, rt.mode) == ("ort", "swap")
    onnx_rt = Runtime.open(folder, threads=1, engine_format="onnx")
    inputs = _ids(m.base.vocab_size)
    tol = load_target(target).tolerance.max_abs_diff
    for task in ("mood", "topic", "mood"):  # and back: a slot flip
        rt.activate(task)
        logits = rt.run(**inputs)["logits"]
        np.testing.assert_array_equal(logits, onnx_rt.run(task=task, **inputs)["logits"])
        baked = ort.InferenceSession(str(folder / m.mobile.engines[m.tasks[task].engine]), providers=CPU)
        assert np.abs(logits - baked.run(["logits"], inputs)[0]).max() <= tol
    rt.activate(None)
    base = ort.InferenceSession(str(folder / m.mobile.engines["base/model.onnx"]), providers=CPU)
    np.testing.assert_allclose(rt.run(**inputs)["last_hidden_state"], base.run(None, inputs)[0], atol=tol)


def test_the_device_bundle_carries_only_ort_models_and_runs_alike(folders, tmp_path, cli):
    folder = folders["mobile-fp32"]
    res = cli("pack", folder, "-o", tmp_path / "bundle")
    assert res.code == 0, res.err
    files = tree(tmp_path / "bundle")
    assert "mobile/swap.ort" in files and "base/swap_w0.safetensors" in files
    assert not [f for f in files if f.endswith((".onnx", ".onnx.data", ".config"))], files
    inputs = _ids(read_manifest(folder).base.vocab_size)
    ours = Runtime.open(tmp_path / "bundle", verify=True).run(task="topic", **inputs)["logits"]
    np.testing.assert_array_equal(ours, Runtime.open(folder).run(task="topic", **inputs)["logits"])
    with pytest.raises(EdgeloraError, match="missing"):  # the ONNX engines did not travel
        Runtime.open(tmp_path / "bundle", engine_format="onnx")


def test_edgelora_run_and_verify_work_on_a_mobile_folder(folders, cli):
    folder = folders["mobile-int8"]
    res = cli("run", folder, "--task", "topic", "--text", "a late goal won it", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["results"][0]["label"] in ("world", "sports", "tech")
    res = cli("verify", folder, "--json")
    assert res.code == 0 and json.loads(res.out)["ok"], res.err


def test_a_provider_this_onnxruntime_lacks_is_one_line(folders):
    folder = folders["mobile-fp32"]
    with pytest.raises(EdgeloraError) as err:
        Runtime.open(folder, provider="XnnpackExecutionProvider")
    msg = str(err.value)
    assert "\n" not in msg and "XnnpackExecutionProvider" in msg and "CPUExecutionProvider" in msg
    for bad, words in (("tflite", "engine_format"), ("ort", "no ORT-format models")):
        with pytest.raises(EdgeloraError, match=words) as err:
            Runtime.open(folder if bad != "ort" else _plain_folder(folder), engine_format=bad)
        assert "\n" not in str(err.value)


def _plain_folder(folder: Path) -> Path:
    """The mobile folder's manifest without its mobile section (as a cpu-* folder is), beside a copy."""
    dst = folder.parent / "plain"
    if not dst.exists():
        shutil.copytree(folder, dst)
        raw = json.loads((dst / "manifest.json").read_text())
        raw.pop("mobile")
        raw["target"]["name"] = "cpu-fp32"
        (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


def test_a_manifest_naming_a_non_ort_model_is_refused_in_one_line(folders):
    raw = json.loads((folders["mobile-fp32"] / "manifest.json").read_text())
    raw["mobile"]["engines"]["base/swap.onnx"] = "base/swap.onnx"
    with pytest.raises(EdgeloraError, match=r"mobile\.engines.*ORT-format") as err:
        parse_manifest(raw)
    assert "\n" not in str(err.value)
    raw = json.loads((folders["mobile-fp32"] / "manifest.json").read_text())
    del raw["files"]["mobile/swap.ort"]
    with pytest.raises(EdgeloraError, match="not in the files table"):
        parse_manifest(raw)


def test_runtime_style_with_the_branch_graph_runs_unmerged_and_mixed_batches_on_ort(adapters, tmp_path):
    """optimization_style = "runtime" at level basic (what NNAPI / CoreML apps take), lora_graph = true: every .ort
    equal to its .onnx opened as the converter opened it; the runtime replays the saved optimizations and runs
    tasks as LoRA branches on mobile/lora.ort, mixed-task batches included."""
    from edgelora.export import export

    text = (Path(__file__).parents[1] / "targets/mobile-fp32.toml").read_text()
    text = (text.replace('optimization_style = "fixed"', 'optimization_style = "runtime"')
            .replace('optimization_level = "all"', 'optimization_level = "basic"')
            .replace("lora_graph = false", "lora_graph = true"))
    (tmp_path / "rt.toml").write_text(text)
    base, ads = adapters
    result = export(base, ads, load_target(tmp_path / "rt.toml"), tmp_path / "out", latency_runs=2)
    rows = result.report["mobile"]["engines"]
    assert rows["base/lora.onnx"]["ort"] == "mobile/lora.ort" and all(r["max_abs_diff"] == 0.0 for r in rows.values())
    m = read_manifest(tmp_path / "out")
    assert (m.mobile.optimization_level, m.mobile.optimization_style) == ("basic", "runtime")
    assert "with_runtime_opt" not in (tmp_path / "out" / m.mobile.operators).read_text()
    inputs = _ids(m.base.vocab_size)
    rt = Runtime.open(tmp_path / "out", unmerged=True)
    assert (rt.engine_format, rt.mode) == ("ort", "unmerged")
    swapped = Runtime.open(tmp_path / "out")
    mixed = rt.run(tasks=["mood", "topic"], **inputs)["logits"]
    for row, task in enumerate(("mood", "topic")):
        one = swapped.run(task=task, **inputs)["logits"][row]
        np.testing.assert_allclose(mixed[row, : one.shape[0]], one, atol=1e-4)


# ---------------------------------------------------------------------------------------------- bad targets
BAD = [
    ("[mobile]\nort = true\noptimization_level = 'max'\n", "optimization_level"),
    ("[mobile]\noptimization_style = 'eager'\n", "optimization_style"),
    ("[mobile]\ntarget_platform = 'riscv'\n", "target_platform"),
    ("[mobile]\nort = 'yes'\n", "ort"),
    ("[mobile]\nquantize = true\n", "unknown field 'quantize'"),
    ("[mobile]\n[providers.TPU]\n", "providers.TPU"),
    ("[mobile]\n[providers.XNNPACK]\nthreads = 2\n", "unknown field 'threads'"),
    ("[mobile]\n[providers.XNNPACK]\nintra_op_num_threads = '2'\n", "intra_op_num_threads"),
    ("[mobile]\n[providers.CoreML]\ncompute_units = 'NPU'\n", "compute_units"),
    ("[mobile]\n[providers.QNN]\nhtp_performance_mode = 'fast'\n", "htp_performance_mode"),
    ("[providers.NNAPI]\nuse_fp16 = true\n", r"add a \[mobile\] section"),
]


@pytest.mark.parametrize("extra, words", BAD)
def test_bad_mobile_and_provider_fields_are_one_line(extra, words, tmp_path, cli, tiny_dir):
    text = (Path(__file__).parents[1] / "targets/cpu-fp32.toml").read_text().split("[shapes]")[0]
    path = tmp_path / "t.toml"
    path.write_text(text + extra)
    with pytest.raises(EdgeloraError, match=words) as err:
        load_target(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    res = cli("export", "--base", tiny_dir("bert"), "--target", path, "-o", tmp_path / "out")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- W1
@pytest.mark.slow
def test_w1_on_mobile_fp32_ort_models_equal_their_onnx_and_swap_tasks(tmp_path):
    """The bundled MiniLM with both example adapters: every .ort equal to its .onnx (the export checks it), the
    runtime on the .ort swap graph equal to the runtime on the .onnx one and within tolerance of the baked engines."""
    from edgelora.export import default_adapters, export

    out = tmp_path / "w1"
    result = export(None, default_adapters(), load_target("mobile-fp32"), out, latency_runs=3)
    rows = result.report["mobile"]["engines"]
    assert set(rows) == {"base/model.onnx", "base/swap.onnx", "base/task-sst2.onnx", "base/task-agnews.onnx"}
    assert all(r["max_abs_diff"] == 0.0 for r in rows.values())
    for task in result.report["tasks"].values():
        assert task["runtime_ort_vs_onnx_max_abs_diff"] == 0.0 and task["runtime_max_abs_diff"] <= 1e-4
    rt = Runtime.open(out, threads=2)
    assert rt.classify(["a gorgeous, witty movie"], task="sst2")[0][0] == "positive"
