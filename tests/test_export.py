"""edgelora export: engines vs the real peft library, the name map and deltas, targets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FAMILIES, assert_one_line_error, make_peft_adapter, peft_reference, tree
from edgelora.converters.onnx.names import WeightLocation
from onnx import numpy_helper

from edgelora.export import engine_size
from edgelora.format.delta import read_delta
from edgelora.format.layout import read_manifest_json as read_manifest
from edgelora.runtime import Runtime
from edgelora.target import load_target


def _ids(vocab: int, batch: int = 2, seq: int = 12) -> np.ndarray:
    return np.random.default_rng(7).integers(3, vocab, size=(batch, seq), dtype=np.int64)


def _engine_logits(path: Path, ids: np.ndarray, manifest_io: dict, extra: dict | None = None,
                   output: str = "logits") -> np.ndarray:
    """Logits for ``ids`` from an engine: one call for encoders; prefill + 2 cached steps for LMs.
    ``extra``: more feeds for every call (LoRA branch inputs)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mask = np.ones_like(ids)
    extra = extra or {}
    if manifest_io["kind"] != "causal-lm":
        return sess.run([output], {"input_ids": ids, "attention_mask": mask, **extra})[0]
    names = [o.name for o in sess.get_outputs()]
    cut = ids.shape[1] - 2
    feeds = {"input_ids": ids[:, :cut], "attention_mask": mask[:, :cut]}
    feeds |= {n: np.zeros((ids.shape[0], manifest_io["num_kv_heads"], 0, manifest_io["head_dim"]), np.float32)
              for n in manifest_io["inputs"] if n.startswith("past_key_values.")}
    pieces = []
    for end in (cut, cut + 1, cut + 2):
        out = dict(zip(names, sess.run(None, {**feeds, **extra}), strict=False))
        pieces.append(out["logits"])
        feeds = {"input_ids": ids[:, end:end + 1], "attention_mask": mask[:, :end + 1]}
        feeds |= {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_engines_match_peft_merge_and_unload(family, family_adapters, exported):
    """Every baked engine equals peft's merge_and_unload model (max |Δlogits| ≤ 1e-4), KV cache included."""
    base, adapters = family_adapters[family]
    task_type, _, labels = FAMILIES[family]
    manifest = read_manifest(exported[family])
    report = json.loads((exported[family] / "report.json").read_text())
    assert report["target"] == "cpu-fp32"
    for name, adapter in adapters.items():
        _, merged = peft_reference(base, adapter, task_type, labels)
        ids = _ids(merged.config.vocab_size)
        with torch.no_grad():
            ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        entry = manifest["tasks"][name]
        got = _engine_logits(exported[family] / entry["engine"], ids, entry["engine_io"])
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4, (family, name, np.abs(got - ref).max())
        assert report["tasks"][name]["max_abs_diff"] <= 1e-4
        assert report["tasks"][name]["agreement"] == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_base_engine_plus_delta_rebuilds_the_task(family, family_adapters, exported):
    """The name map and the delta file are enough to rebuild each task from the base engine:
    write W0 + s·B·A into the mapped initializers (pristine W0 each time) and the graph computes
    what peft's merged model computes."""
    base, adapters = family_adapters[family]
    task_type, _, labels = FAMILIES[family]
    dep = exported[family]
    manifest = read_manifest(dep)
    base_graph = onnx.load(str(dep / manifest["base"]["engine"]))
    inits = {i.name: i for i in base_graph.graph.initializer}
    locations = {m: WeightLocation.from_json(d) for m, d in manifest["name_map"]["modules"].items()}
    pristine = {loc.initializer: numpy_helper.to_array(inits[loc.initializer]).copy() for loc in locations.values()}

    unmerged_ref, _ = peft_reference(base, adapters["t1"], task_type, labels)
    w0 = {n: p.detach().numpy() for n, p in unmerged_ref.get_base_model().state_dict().items()}
    for module, loc in locations.items():  # the map points at W0 itself, in the graph's layout
        key = next(k for k in w0 if k.endswith(f"{module}.base_layer.weight") or k == f"{module}.weight")
        expected = w0[key].T if FAMILIES[family][1].get("fan_in_fan_out") else w0[key]
        np.testing.assert_array_equal(loc.read(pristine[loc.initializer]), expected)

    for name, adapter in adapters.items():
        modules, head = read_delta(dep / manifest["tasks"][name]["delta"])
        assert set(modules) == set(manifest["tasks"][name]["modules"])
        arrays = {k: v.copy() for k, v in pristine.items()}
        for module, d in modules.items():
            loc = locations[module]
            loc.write(arrays[loc.initializer], loc.read(pristine[loc.initializer]) + d.scale * (d.B @ d.A))
        model = onnx.load(str(dep / manifest["base"]["engine"]))
        for init in model.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
        rebuilt = Path(dep.parent / f"rebuilt-{name}.onnx")
        onnx.save(model, str(rebuilt))
        _, merged = peft_reference(base, adapter, task_type, labels)
        ids = _ids(merged.config.vocab_size)
        if manifest["task"] == "causal-lm":
            got = _engine_logits(rebuilt, ids, manifest["base"]["io"])
            with torch.no_grad():
                ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        else:  # headless encoder + the task's head from the delta file, applied as the runtime will
            sess = ort.InferenceSession(str(rebuilt), providers=["CPUExecutionProvider"])
            pooled = sess.run(["pooler_output"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
            got = pooled @ head["classifier.weight"].T + head["classifier.bias"]
            with torch.no_grad():
                ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        assert np.abs(got - ref).max() <= 1e-4, (family, name, np.abs(got - ref).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_branch_graph_is_the_base_at_rank_0_and_each_task_with_its_delta(family, family_adapters, exported):
    """base/lora.onnx keeps LoRA unmerged, A and B as inputs: rank 0 computes the base engine, a task's
    delta computes what peft's merged model computes (KV cache included for decoders)."""
    from edgelora.converters.onnx.lora import branch_feeds, zero_rank_feeds

    base, adapters = family_adapters[family]
    task_type, _, labels = FAMILIES[family]
    dep = exported[family]
    manifest = read_manifest(dep)
    graph = manifest["lora_graph"]
    locations = {m: WeightLocation.from_json(d) for m, d in graph["modules"].items()}
    inputs = {m: tuple(v) for m, v in graph["inputs"].items()}
    io = manifest["base"]["io"]
    out = "logits" if io["kind"] == "causal-lm" else "pooler_output"
    ids = _ids(manifest["base"]["vocab_size"])
    at_zero = _engine_logits(dep / graph["engine"], ids, io, zero_rank_feeds(inputs, locations), out)
    base_engine = _engine_logits(dep / manifest["base"]["engine"], ids, io, None, out)
    assert np.abs(at_zero - base_engine).max() <= 1e-5
    for name, adapter in adapters.items():
        modules, head = read_delta(dep / manifest["tasks"][name]["delta"])
        got = _engine_logits(dep / graph["engine"], ids, io, branch_feeds(modules, inputs, locations), out)
        if out == "pooler_output":
            got = got @ head["classifier.weight"].T + head["classifier.bias"]
        _, merged = peft_reference(base, adapter, task_type, labels)
        with torch.no_grad():
            ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        assert np.abs(got - ref).max() <= 1e-4, (family, name, np.abs(got - ref).max())


def test_every_exported_manifest_validates_against_the_published_schema(exported):
    """The JSON Schema a runtime in another language reads (edgelora/format/manifest.schema.json) accepts every
    family's manifest, and edgelora's own typed reader gives it back unchanged (one writer, one reader)."""
    from conftest import schema_validator

    from edgelora.format.manifest import parse_manifest

    validator = schema_validator()
    for family, dep in exported.items():
        manifest = read_manifest(dep)
        errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
        assert not errors, (family, errors[0].message, list(errors[0].path))
        assert parse_manifest(manifest).to_json() == manifest, family


def test_manifest_and_report_follow_the_schema(exported, family_adapters):
    dep = exported["bert"]
    manifest = read_manifest(dep)
    report = json.loads((dep / "report.json").read_text())
    assert manifest["format"] == 3 and manifest["task"] == "sequence-classification"
    from edgelora.base import fingerprint

    assert manifest["base"]["fingerprint"] == report["base"]["fingerprint"] == fingerprint(family_adapters["bert"][0])
    assert set(report["base"]) >= {"fingerprint", "size_bytes", "latency_ms"}
    for name in ("t1", "t2"):
        t = report["tasks"][name]
        assert set(t) >= {"accuracy", "torch_accuracy", "max_abs_diff", "cosine", "agreement", "latency_ms",
                          "engine_size_bytes", "delta_size_bytes"}
        assert t["accuracy"] is None and t["torch_accuracy"] is None  # no --eval given
        engine = dep / manifest["tasks"][name]["engine"]  # patched: its own weights + the base engine's it reads
        base_weights = engine_size(dep / manifest["base"]["engine"]) - (dep / manifest["base"]["engine"]).stat().st_size
        assert engine.stat().st_size < t["engine_size_bytes"] <= engine.stat().st_size + base_weights
        assert t["delta_size_bytes"] == (dep / manifest["tasks"][name]["delta"]).stat().st_size
        assert manifest["tasks"][name]["rank"] == 4 and manifest["tasks"][name]["targets"] == ["query", "value"]
    assert (dep / "report.md").read_text().count("|") > 10
    assert len(manifest["name_map"]["modules"]) == 2 * 2  # query, value of 2 layers
    assert manifest["name_map"]["graph"] == ("fused fp32" if manifest["base"]["fused"] else "fp32")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_engines_stay_within_their_tolerance(precision, family_adapters, tmp_path, cli):
    """Quantized bert and llama engines: the export passes its own check, and an independent check
    against peft's merged model agrees with the numbers in the report."""
    target = tmp_path / f"t-{precision}.toml"
    # tiny random models have almost flat logits: the tolerance is loose, the check is real
    method = "dynamic" if precision == "int8" else "matmul_nbits"
    opset = 17 if precision == "int8" else 21
    min_cos = 0.9 if precision == "int8" else 0.8  # 4 bits on a 32-wide random model: coarse, but checked
    target.write_text(f'name = "tiny-{precision}"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\n'
                      f'precision = "{precision}"\nopset = {opset}\n[quantization]\nmethod = "{method}"\n'
                      f'block_size = 16\n[tolerance]\nmax_abs_diff = 5.0\nmin_cosine = {min_cos}\n'
                      'min_agreement = 0.3\n')
    if precision == "int4":  # attention projections at 8 bits, the rest at 4
        target.write_text(target.read_text().replace("block_size = 16\n",
                                                     'block_size = 16\neight_bit_nodes = ["/self_attn/"]\n'))
    for family in ("bert", "llama"):
        base, adapters = family_adapters[family]
        res = cli("export", "--base", base, "--adapter", f"t1={adapters['t1']}", "--target", target,
                  "-o", tmp_path / family, "-q", "--json")
        assert res.code == 0, res.err
        report = json.loads(res.out)
        manifest = read_manifest(tmp_path / family)
        graph = onnx.load(str(tmp_path / family / manifest["tasks"]["t1"]["engine"]))
        ops = {n.op_type for n in graph.graph.node}
        if precision == "int4":
            assert "MatMulNBits" in ops
            bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
                    for n in graph.graph.node if n.op_type == "MatMulNBits"}
            if family == "llama":
                assert {b for n, b in bits.items() if "/self_attn/" in n} == {8}
                assert {b for n, b in bits.items() if "/mlp/" in n} == {4}
        else:
            assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}, ops
        task_type, _, labels = FAMILIES[family]
        _, merged = peft_reference(base, adapters["t1"], task_type, labels)
        ids = _ids(merged.config.vocab_size)
        with torch.no_grad():
            ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        got = _engine_logits(tmp_path / family / manifest["tasks"]["t1"]["engine"], ids,
                             manifest["tasks"]["t1"]["engine_io"])
        cos = float((got.ravel() @ ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos >= min_cos and np.abs(got - ref).max() <= 5.0, (family, cos)
        assert 0 < np.abs(got - ref).max()  # it really is quantized
        assert report["tasks"]["t1"]["cosine"] >= min_cos
        # the runtime on the quantized base: int8 re-quantizes the swapped weights (the baked engine's
        # bits), int4 keeps the task unmerged on the quantized base (base/lora.onnx)
        rt = Runtime.open(tmp_path / family, threads=1, unmerged=False)
        # (int4 leaves BERT's fused Attention weights in float: MatMulNBits takes MatMuls only, so they swap)
        assert rt.mode == ("unmerged" if (precision, family) == ("int4", "llama") else "swap")
        rt.activate("t1")
        mine = rt.run(input_ids=ids)["logits"]
        cos = float((mine.ravel() @ ref.ravel()) / np.linalg.norm(mine) / np.linalg.norm(ref))
        assert cos >= min_cos and np.abs(mine - ref).max() <= 5.0, (family, precision, cos)
        if precision == "int8" and family == "bert":
            assert np.abs(mine - got).max() <= 1e-4  # same int8 weights as the baked engine, fp32 head
            # later switches copy the int8 encoding the first one kept; a loaded delta is encoded at load: the
            # same bits as re-quantizing
            kept = rt.store.get("t1").encoded
            assert kept and all(v.dtype in (np.int8, np.float32) for v in kept.values())
            for _ in range(2):
                rt.activate(None)
                rt._forget_built()
                rt.activate("t1")
                assert np.array_equal(rt.run(input_ids=ids)["logits"], mine)
            rt.load("again", tmp_path / family / manifest["tasks"]["t1"]["delta"])
            assert set(rt.store.get("again").encoded) == set(kept)
            assert all(np.array_equal(rt.store.get("again").encoded[k], v) for k, v in kept.items())
            rt._forget_built()
            rt.activate("again")
            assert np.array_equal(rt.run(input_ids=ids)["logits"], mine)


def test_int4_stores_tied_embeddings_once(family_adapters, tmp_path, cli):
    """The bundled cpu-int4 recipe on a tied decoder (qwen2): the embedding Gather reads the 8-bit LM
    head's blocks (no float or second quantized copy of the table), the rows it returns are the table
    within 8-bit rounding, and the engines still match peft (export check, runtime on base/lora.onnx)."""
    base, adapters = family_adapters["qwen2"]
    bundled = Path(load_target("cpu-int4").source).read_text()
    # a 32-wide random model has almost flat logits: loose tolerance, same quantization recipe
    target = tmp_path / "int4.toml"
    target.write_text(bundled.split("[tolerance]")[0] + "[tolerance]\nmax_abs_diff = 5.0\nmin_cosine = 0.8\n"
                                                         "min_agreement = 0.3\n")
    res = cli("export", "--base", base, "--adapter", f"t1={adapters['t1']}", "--target", target,
              "-o", tmp_path / "o", "-q")
    assert res.code == 0, res.err
    manifest = read_manifest(tmp_path / "o")
    _, merged = peft_reference(base, adapters["t1"], "CAUSAL_LM")
    table = merged.get_input_embeddings().weight.detach().numpy()
    for engine in ("base/model.onnx", "base/lora.onnx", manifest["tasks"]["t1"]["engine"]):
        graph = onnx.load(str(tmp_path / "o" / engine))
        nodes = {n.op_type: n for n in graph.graph.node}
        head = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
        gather = nodes["GatherBlockQuantized"]
        assert gather.input[0] == head.input[1]  # one stored copy
        assert {a.name: a.i for a in head.attribute}["bits"] == 8
        assert not [i.name for i in graph.graph.initializer if sorted(i.dims) == sorted(table.shape)]
        # the rows it gathers: the table within half an 8-bit step of each row's largest value
        rows_name = gather.output[0].removesuffix("_blocks")  # after the reshape (and the cut of a padded block)
        graph.graph.output.append(onnx.helper.make_tensor_value_info(rows_name, onnx.TensorProto.FLOAT, None))
        onnx.save(graph, str(tmp_path / "probe.onnx"))
        ids = _ids(table.shape[0])
        sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
                 for i in sess.get_inputs() if i.name.startswith("past_key_values")}  # (LoRA inputs: defaults)
        rows = sess.run([rows_name], {"input_ids": ids, "attention_mask": np.ones_like(ids), **feeds})[0]
        step = np.abs(table[ids]).max(-1, keepdims=True) / 127
        assert rows.shape == table[ids].shape
        assert 0 < np.abs(rows - table[ids]).max() and np.all(np.abs(rows - table[ids]) <= step * 0.51 + 1e-7)
    rt = Runtime.open(tmp_path / "o", threads=1)
    assert rt.mode == "unmerged"
    rt.activate("t1")
    ids = _ids(table.shape[0])
    with torch.no_grad():
        ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
    mine = rt.run(input_ids=ids)["logits"]
    assert float((mine.ravel() @ ref.ravel()) / np.linalg.norm(mine) / np.linalg.norm(ref)) >= 0.8


def test_int4_tied_embeddings_with_an_asymmetric_head_keep_their_own_copy(family_adapters, tmp_path, cli):
    """A 4-bit asymmetric LM head has zero points the shared Gather does not take: the embedding is then
    quantized on its own (GatherBlockQuantized over its own table), and the engine still checks out."""
    base, adapters = family_adapters["qwen2"]
    target = tmp_path / "int4-asym.toml"
    target.write_text('name = "asym"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "int4"\n'
                      'opset = 21\n[quantization]\nmethod = "matmul_nbits"\nblock_size = 16\nsymmetric = false\n'
                      'eight_bit_nodes = ["/self_attn/"]\n[tolerance]\nmax_abs_diff = 5.0\nmin_cosine = 0.8\n'
                      'min_agreement = 0.3\n')
    res = cli("export", "--base", base, "--adapter", f"t1={adapters['t1']}", "--target", target,
              "-o", tmp_path / "o", "-q")
    assert res.code == 0, res.err
    graph = onnx.load(str(tmp_path / "o" / "base/model.onnx"))
    head = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    assert len(head.input) > 3 and gather.input[0] != head.input[1]
    assert not [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                and 32 in i.dims and max(i.dims) > 32]  # no float table or head left


def test_export_is_repeatable_and_forceable(family_adapters, tmp_path, cli):
    base, adapters = family_adapters["qwen2"]
    args = ["export", "--base", base, "--adapter", f"a={adapters['t1']}", "-o", tmp_path / "o", "-q"]
    assert cli(*args).code == 0
    first = {p: (tmp_path / "o" / p).read_bytes() for p in ("base/model.onnx", "tasks/a/delta.safetensors",
                                                             "base/task-a.onnx")}
    res = cli(*args)
    assert res.code == 2 and "--force" in res.err
    assert cli(*args, "--force").code == 0
    for p, data in first.items():
        assert (tmp_path / "o" / p).read_bytes() == data, p
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp folders left beside it


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing on disk
# --------------------------------------------------------------------------------------------------


_one_line_error = assert_one_line_error


def test_unknown_target_name(family_adapters, tmp_path, cli):
    base, adapters = family_adapters["bert"]
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target", "tpu-int2",
              "-o", tmp_path / "o")
    _one_line_error(res, "unknown target 'tpu-int2'", "cpu-int8")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("text, needle", [
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "int3"\nopset = 17\n',
     "precision = 'int3'"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "fp32"\n', "'opset'"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "fp32"\nopset = "17"\n',
     "'opset'"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "fp32"\nopset = 17\n'
     '[shapes]\nbatch = 1\nseqlen = 128\n', "unknown field 'seqlen'"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "int4"\nopset = 21\n'
     '[quantization]\nmethod = "matmul_nbits"\nblock_size = 24\n', "block_size = 24"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "int4"\nopset = 21\n'
     '[quantization]\nmethod = "matmul_nbits"\neight_bit_nodes = "attn"\n', "must be a list of strings"),
    ('name = "x"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\nprecision = "int4"\nopset = 21\n'
     '[quantization]\nmethod = "matmul_nbits"\neight_bit_block_size = 512\n', "eight_bit_block_size = 512"),
    ('name = "x\nbackend', "not valid TOML"),
])
def test_target_file_with_a_wrong_field(text, needle, family_adapters, tmp_path, cli):
    base, adapters = family_adapters["bert"]
    (tmp_path / "t.toml").write_text(text)
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target", tmp_path / "t.toml",
              "-o", tmp_path / "o")
    _one_line_error(res, str(tmp_path / "t.toml"), needle)
    assert tree(tmp_path) == ["t.toml"]


def test_adapter_for_another_base(tiny_dir, tmp_path, cli):
    """The example adapter records the MiniLM fingerprint: refused on any other base, before any work."""
    from conftest import REPO

    res = cli("export", "--base", tiny_dir("bert"), "--adapter", f"s={REPO / 'examples/adapters/sst2'}",
              "-o", tmp_path / "o")
    _one_line_error(res, "fingerprint")
    assert tree(tmp_path) == []


def test_adapter_for_modules_the_base_does_not_have(family_adapters, tiny_dir, tmp_path, cli):
    _, adapters = family_adapters["bert"]  # query/value of a BERT on a LLaMA base
    res = cli("export", "--base", tiny_dir("llama"), "--adapter", f"a={adapters['t1']}", "-o", tmp_path / "o")
    _one_line_error(res, "query")
    assert tree(tmp_path) == []


def test_adapter_on_a_module_the_exporter_cannot_map(tiny_dir, tmp_path, cli):
    """LoRA on GPT-2's lm_head: its weight is the tied embedding, which the graph holds twice (the
    Gather table and a transposed copy for the head MatMul). Placing a delta would be a guess."""
    base = tiny_dir("gpt2")
    adapter = make_peft_adapter(base, tmp_path / "ad", task_type="CAUSAL_LM", target_modules=["lm_head"], r=2,
                                lora_alpha=4)
    res = cli("export", "--base", base, "--adapter", f"a={adapter}", "-o", tmp_path / "o")
    _one_line_error(res, "lm_head")
    assert tree(tmp_path / "o") == [] and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_unwritable_output(family_adapters, tmp_path, cli):
    import os

    base, adapters = family_adapters["bert"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "-o", locked / "o")
        _one_line_error(res, str(locked / "o"))
    finally:
        locked.chmod(0o700)
    assert tree(locked) == []


def test_output_under_a_file_is_refused(family_adapters, tmp_path, cli):
    base, adapters = family_adapters["bert"]
    (tmp_path / "f").write_text("x")
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "-o", tmp_path / "f" / "o")
    _one_line_error(res, str(tmp_path / "f" / "o"))
    assert tree(tmp_path) == ["f"]


@pytest.mark.parametrize("args, needle", [
    (["--adapter", "nopath"], "NAME=PATH"),
    (["--adapter", "a=/nonexistent/adapter"], "/nonexistent/adapter"),
    (["--eval", "zzz=x.tsv"], "no adapter named 'zzz'"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments(args, needle, family_adapters, tmp_path, cli):
    base, adapters = family_adapters["bert"]
    extra = [] if args[0] == "--adapter" else ["--adapter", f"a={adapters['t1']}"]
    res = cli("export", "--base", base, *extra, *args, "-o", tmp_path / "o")
    _one_line_error(res, needle)
    assert tree(tmp_path) == []


def test_tolerance_miss_fails_with_exit_1_and_leaves_nothing(family_adapters, tmp_path, cli):
    base, adapters = family_adapters["bert"]
    target = tmp_path / "strict.toml"
    target.write_text('name = "strict-int8"\nbackend = "onnxruntime"\nprovider = "CPUExecutionProvider"\n'
                      'precision = "int8"\nopset = 17\n[quantization]\nmethod = "dynamic"\n'
                      '[tolerance]\nmax_abs_diff = 1e-9\n')
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target", target, "-o", tmp_path / "o")
    assert res.code == 1 and "failed verification" in res.err and "max |Δ|" in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert tree(tmp_path) == ["strict.toml"]


def test_bundled_targets_load_and_are_installed_with_the_package():
    from edgelora.target import bundled_targets

    names = set(bundled_targets())
    assert {"cpu-fp32", "cpu-int8", "cpu-int4", "cuda-fp16"} <= names
    t = load_target("cpu-int4")
    assert t.precision == "int4" and t.quantization.block_size >= 16 and t.opset >= 21
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        t.precision = "fp32"


def test_cuda_target_without_a_gpu_says_so(family_adapters, tmp_path, cli):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU runtime is installed here")
    base, adapters = family_adapters["bert"]
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target", "cuda-fp16",
              "-o", tmp_path / "o")
    _one_line_error(res, "CUDAExecutionProvider", "edgelora[gpu]")
    assert tree(tmp_path) == []


def _fp16_target(path: Path, provider: str) -> Path:
    path.write_text(f'name = "fp16-test"\nbackend = "onnxruntime"\nprovider = "{provider}"\nprecision = "fp16"\n'
                    'opset = 17\n[tolerance]\nmax_abs_diff = 0.05\nmin_cosine = 0.999\nmin_agreement = 0.9\n')
    return path


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fp16_engines_on_the_cpu_match_pytorch(family, family_adapters, tmp_path, cli):
    """The fp16 cast (what cuda-fp16 ships) runs on ONNX Runtime's CPU provider too: checked here
    against peft's merged model, so the GPU target's graph is exercised on every machine."""
    base, adapters = family_adapters[family]
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target",
              _fp16_target(tmp_path / "t.toml", "CPUExecutionProvider"), "-o", tmp_path / "o", "-q")
    assert res.code == 0, res.err
    manifest = read_manifest(tmp_path / "o")
    graph = onnx.load(str(tmp_path / "o" / manifest["tasks"]["a"]["engine"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    task_type, _, labels = FAMILIES[family]
    _, merged = peft_reference(base, adapters["t1"], task_type, labels)
    ids = _ids(merged.config.vocab_size)
    with torch.no_grad():
        ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = _engine_logits(tmp_path / "o" / manifest["tasks"]["a"]["engine"], ids, manifest["tasks"]["a"]["engine_io"])
    assert 0 < np.abs(got - ref).max() <= 0.05
    rt = Runtime.open(tmp_path / "o", threads=1, unmerged=False)  # swaps cast W0 + ΔW to fp16 into the fed weights
    assert rt.mode == "swap" and {w["recipe"] for w in manifest["swap"]["weights"].values()} == {"float16"}
    rt.activate("a")
    assert np.abs(rt.run(input_ids=ids)["logits"] - ref).max() <= 0.05


@pytest.mark.gpu
def test_cuda_fp16_target_on_a_gpu(family_adapters, tmp_path, cli):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider here: pip install 'edgelora[gpu]' on a machine with an NVIDIA GPU")
    base, adapters = family_adapters["llama"]
    res = cli("export", "--base", base, "--adapter", f"a={adapters['t1']}", "--target", "cuda-fp16",
              "-o", tmp_path / "o", "-q", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["tasks"]["a"]["cosine"] >= 0.999


def test_dora_adapter_exports_baked_and_is_marked_not_swappable(tiny_dir, tmp_path, cli):
    """DoRA is no W0 + s·B·A update: its baked engine equals peft's merged model, and the manifest says
    the delta cannot be swapped on a device (the LoRA-branch check is not applied to it)."""
    base = tiny_dir("llama")
    adapter = make_peft_adapter(base, tmp_path / "ad", task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                r=4, lora_alpha=8, use_dora=True)
    res = cli("export", "--base", base, "--adapter", f"d={adapter}", "-o", tmp_path / "o", "-q", "--json")
    assert res.code == 0, res.err
    entry = read_manifest(tmp_path / "o")["tasks"]["d"]
    assert entry["swappable"] is False and "DoRA" in entry["not_swappable_reason"]
    assert "unmerged_max_abs_diff" not in json.loads(res.out)["tasks"]["d"]
    _, merged = peft_reference(base, adapter, "CAUSAL_LM")
    ids = _ids(merged.config.vocab_size)
    with torch.no_grad():
        ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = _engine_logits(tmp_path / "o" / entry["engine"], ids, entry["engine_io"])
    assert np.abs(got - ref).max() <= 1e-4
