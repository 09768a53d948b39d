"""Reference vectors a folder carries and the self test any machine runs on them (``Runtime.self_test``,
``edgelora verify --conformance``): they are PyTorch's numbers, they pass on an untouched folder, and they catch
what a hash cannot — engine data altered with the manifest's hashes rewritten to match, a task whose delta became a
no-op — in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, REPO, assert_one_line_error, peft_reference, schema_validator

from edgelora.format.conformance import CONFORMANCE_FILE, parse_references
from edgelora.format.delta import parse_delta, write_delta
from edgelora.format.manifest import read_manifest
from edgelora.lora import DeltaModule
from edgelora.runtime import Runtime


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _rehash(folder: Path) -> None:
    """What a tamperer who can write the folder does: the manifest's size and sha256 of every file made to match
    the bytes now there, so only the numbers can tell."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for rel in manifest["files"]:
        data = (folder / rel).read_bytes()
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest, indent=1))


def _scale_initializer(folder: Path, engine: str, skip: set[str], factor: float) -> str:
    """Multiply the largest float32 initializer of ``engine`` not in ``skip`` by ``factor`` where its bytes live
    (the engine's external data file, or the model file itself); returns its name."""
    import onnx
    from onnx import numpy_helper

    path = folder / engine
    model = onnx.load(str(path), load_external_data=False)
    best, size = None, 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in skip:
            continue
        info = {e.key: e.value for e in init.external_data}
        n = int(info.get("length", 0)) if info else len(init.raw_data)
        if n > size:
            best, size = init, n
    assert best is not None, f"no float initializer in {engine}"
    info = {e.key: e.value for e in best.external_data}
    if info:  # in the data file: change the bytes in place
        data_path = path.parent / info["location"]
        raw = bytearray(data_path.read_bytes())
        start = int(info.get("offset", 0))
        w = np.frombuffer(bytes(raw[start:start + size]), "<f4") * np.float32(factor)
        raw[start:start + size] = w.astype("<f4").tobytes()
        data_path.write_bytes(bytes(raw))
    else:
        best.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(best) * np.float32(factor), best.name))
        onnx.save(model, str(path))
    return best.name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reference_vectors_are_pytorch_and_pass_untouched(exported, family_adapters, cli, family):
    folder = exported[family]
    manifest = read_manifest(folder)
    spec = manifest.conformance
    assert spec is not None and spec.file == CONFORMANCE_FILE and spec.reference == "pytorch"
    assert spec.file in manifest.files and manifest.files[spec.file].size < 100_000  # kilobytes, hashed
    schema_validator().validate(json.loads((folder / "manifest.json").read_text()))
    tol = manifest.target.spec["tolerance"]
    assert (spec.tolerance.max_abs_diff, spec.tolerance.min_cosine) == (tol["max_abs_diff"], tol["min_cosine"])
    refs = parse_references((folder / spec.file).read_bytes(), spec, spec.file)
    assert set(refs) == {"t1", "t2"}
    # the expected outputs are PEFT's own (merge_and_unload), not the engine's
    base, adapters = family_adapters[family]
    task_type, _, labels = FAMILIES[family]
    ref = refs["t1"]
    _, merged = peft_reference(base, adapters["t1"], task_type, labels)
    with torch.no_grad():
        out = merged(input_ids=torch.from_numpy(ref.inputs["input_ids"]),
                     attention_mask=torch.from_numpy(ref.inputs["attention_mask"])).logits.numpy()
    if ref.positions == "last":
        out = out[:, -1]
    np.testing.assert_allclose(ref.outputs["logits"], out, atol=1e-5, rtol=1e-5)
    assert ref.inputs["attention_mask"].min() == 0 or family != "bert"  # an encoder's rows include padding

    res = cli("verify", "--conformance", folder)
    assert res.code == 0, res
    lines = res.out.strip().splitlines()
    assert lines[-1].startswith("conformance: 7 checks passed in "), res.out
    for needle in ("t1: reference (", "t1: baked engine", "t2: changes the outputs", "A→B→A (t1→t2→t1)"):
        assert any(needle in line and line.lstrip().startswith("pass") for line in lines), (needle, res.out)


def test_catches_engine_data_altered_with_hashes_rewritten(exported, cli, tmp_path):
    folder = _copy(exported["bert"], tmp_path)
    manifest = read_manifest(folder)
    swap = manifest.swap
    assert swap is not None
    # not a LoRA target's weight (their W0 bytes carry their own hash): a weight only the numbers vouch for
    name = _scale_initializer(folder, swap.engine, set(swap.weights) | {w.inputs["weight"] for w in
                                                                       swap.weights.values()}, 1.05)
    _rehash(folder)
    assert cli("verify", folder).code == 0  # every hash matches: the files alone cannot tell
    res = cli("verify", "--conformance", folder)
    assert res.code == 1, (name, res)
    err = res.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: conformance failed: t1: reference (swap): "), res.err
    assert "max |Δ|" in err[0] and "bound" in err[0], err[0]  # measured vs bound
    assert any(line.lstrip().startswith("FAIL") for line in res.out.splitlines())


def test_catches_a_no_op_task(exported, cli, tmp_path):
    folder = _copy(exported["bert"], tmp_path)
    manifest = read_manifest(folder)
    rel = manifest.tasks["t2"].delta
    delta = parse_delta((folder / rel).read_bytes(), rel)
    zeros = {m: DeltaModule(m, d.A, np.zeros_like(d.B), d.scale) for m, d in delta.modules.items()}
    write_delta(folder / rel, zeros, delta.head, delta.base_fingerprint, delta.labels, delta.pooling)
    _rehash(folder)
    assert cli("verify", folder).code == 0
    test = Runtime.open(folder).self_test()
    failed = {(c.task, c.check) for c in test.checks if not c.ok}
    assert ("t2", "changes the outputs") in failed, test.checks
    assert not any(task == "t1" for task, _ in failed), failed  # the other task is untouched
    res = cli("verify", "--conformance", folder)
    assert res.code == 1 and res.err.count("\n") == 1 and "conformance failed: t2:" in res.err, res


def test_folder_without_reference_vectors_says_so_in_one_line(exported, cli, tmp_path):
    folder = _copy(exported["bert"], tmp_path)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["conformance"]
    del manifest["files"][CONFORMANCE_FILE]
    (folder / CONFORMANCE_FILE).unlink()
    path.write_text(json.dumps(manifest))
    assert cli("verify", folder).code == 0  # an older folder still opens
    assert Runtime.open(folder).self_test().unavailable is not None
    assert_one_line_error(cli("verify", "--conformance", folder), "no reference vectors", "re-export")


def test_device_bundle_carries_and_passes_it(exported, cli, tmp_path):
    bundle = tmp_path / "bundle"
    assert cli("pack", exported["bert"], "-o", bundle).code == 0
    assert (bundle / CONFORMANCE_FILE).is_file()
    res = cli("verify", "--conformance", bundle)
    assert res.code == 0 and "checks passed" in res.out, res


@pytest.mark.parametrize("family, target", [("bert", "cpu-int8"), ("llama", "cpu-int4")])
def test_quantized_folders_pass_against_pytorch(family_adapters, cli, tmp_path, family, target):
    """int8 / int4 engines are held to the target's tolerances against PyTorch (not bit-equal to the building
    machine's engine: CPUs' int8 kernels differ); the export ran the same check before publishing. The tiny
    models' near-flat logits get test_contract's loose bounds (block size 16: the weights are 32 wide)."""
    base, adapters = family_adapters[family]
    out = tmp_path / "out"
    text = (REPO / "targets" / f"{target}.toml").read_text().split("[tolerance]")[0]
    text = text.replace("block_size = 32", "block_size = 16").replace("eight_bit_block_size = 256",
                                                                      "eight_bit_block_size = 16")
    bounds = {"cpu-int8": (5.0, 0.9, 0.3), "cpu-int4": (5.0, 0.8, 0.3)}[target]
    toml = tmp_path / f"{target}.toml"
    toml.write_text(text + "[tolerance]\nmax_abs_diff = {}\nmin_cosine = {}\nmin_agreement = {}\n".format(*bounds))
    args = ["export", "--base", base, "--target", toml, "-o", out, "-q"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    assert cli(*args).code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conformance"]["ok"] and report["conformance"]["checks"] >= 5, report.get("conformance")
    test = Runtime.open(out).self_test()
    assert test.ok, test.summary()
    spec = read_manifest(out).conformance
    assert spec is not None and (spec.tolerance.min_cosine, spec.tolerance.min_agreement) == bounds[1:]
