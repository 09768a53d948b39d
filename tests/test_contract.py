"""One contract for every family × target, as PEFT's common tester holds every tuner to one.

Families: BERT (sequence classification), GPT-2, LLaMA, Qwen2, OPT, Mistral (causal LMs), tiny and seeded, two
adapters each made by the real peft library. Targets: cpu-fp32, cpu-int8, cpu-int4 and the fp16 graph on the CPU
provider (the bundled recipes, with tolerances for 32-wide random models). Checks, per pair:

- every baked engine vs PyTorch + peft's merged model (an independent check, not the export's own numbers);
- the patched bake vs the re-exported one (``--bake reexport``): fp32 within 1e-5, others the target's tolerance;
- the runtime's swap and its LoRA branches vs the baked engines;
- an export re-run rewrites the same bytes.

Each pair exports three times (patched, re-exported, re-run): marked slow; the whole suite takes ~2 min.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES as BASE_FAMILIES
from conftest import REPO, make_peft_adapter, peft_reference

from edgelora.format.layout import read_manifest_json as read_manifest
from edgelora.runtime import Runtime

FAMILIES = {  # the four of the shared fixtures, and two more decoder families
    **BASE_FAMILIES,
    "opt": ("CAUSAL_LM", {"target_modules": ["q_proj", "v_proj", "out_proj"], "r": 4, "lora_alpha": 8}, None),
    "mistral": ("CAUSAL_LM", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "lora_alpha": 8},
                None),
}
# (max |Δ| vs PyTorch, min cosine, min agreement): 32-wide random models have near-flat logits, so quantized
# targets get loose bounds; the checks are real (a wrong weight is far outside them)
TOLERANCE = {"cpu-fp32": (1e-4, 0.99999, 1.0), "cpu-int8": (5.0, 0.9, 0.3), "cpu-int4": (5.0, 0.8, 0.3),
             "cpu-fp16": (0.05, 0.999, 0.9)}
TARGETS = list(TOLERANCE)


def _target(name: str, folder: Path) -> Path:
    """The bundled target with the tolerances above (block size 16: the tiny weights are 32 wide)."""
    source = REPO / "targets" / (f"{name}.toml" if name != "cpu-fp16" else "cuda-fp16.toml")
    text = source.read_text().split("[tolerance]")[0]
    if name == "cpu-fp16":
        text = text.replace('"CUDAExecutionProvider"', '"CPUExecutionProvider"').replace('"cuda-fp16"', '"cpu-fp16"')
    text = text.replace("block_size = 32", "block_size = 16").replace("eight_bit_block_size = 256",
                                                                      "eight_bit_block_size = 16")
    diff, cos, agree = TOLERANCE[name]
    path = folder / f"{name}.toml"
    path.write_text(text + f"[tolerance]\nmax_abs_diff = {diff}\nmin_cosine = {cos}\nmin_agreement = {agree}\n")
    return path


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    out = {}
    for family, (task_type, kw, labels) in FAMILIES.items():
        root = tmp_path_factory.mktemp(f"contract_{family}")
        out[family] = (tiny_dir(family), {f"t{s}": make_peft_adapter(tiny_dir(family), root / f"t{s}", seed=s,
                                                                     num_labels=labels, task_type=task_type, **kw)
                                          for s in (1, 2)})
    return out


_EXPORTS: dict[tuple[str, str], dict[str, Path]] = {}


@pytest.fixture
def deployment(request, adapters, tmp_path_factory) -> dict[str, Path]:
    """(family, target) -> {"patched", "reexported", "rerun"} folders, each exported once per session."""
    from edgelora.cli import main

    family, target = request.param
    key = (family, target)
    if key not in _EXPORTS:
        root = tmp_path_factory.mktemp(f"c_{family}_{target}")
        base, tasks = adapters[family]
        args = ["export", "--base", str(base), "--target", str(_target(target, root)), "-q", "--force"]
        for name, path in tasks.items():
            args += ["--adapter", f"{name}={path}"]
        out = {}
        for label, extra in (("patched", []), ("reexported", ["--bake", "reexport"]), ("rerun", [])):
            out[label] = root / label
            try:
                main([*args, "-o", str(out[label]), *extra])
            except SystemExit as exc:
                assert exc.code in (0, None), f"export {family} {target} ({label}) failed"
        _EXPORTS[key] = out
    return _EXPORTS[key]


PAIRS = [(f, t) for f in FAMILIES for t in TARGETS]


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(11).integers(6, vocab, size=(2, 10), dtype=np.int64)


def _run(path: Path, io: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of an engine for ``ids`` (decoders: an empty cache)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if io["kind"] == "causal-lm":
        feeds |= {n: np.zeros((ids.shape[0], io["num_kv_heads"], 0, io["head_dim"]), np.float32)
                  for n in io["inputs"] if n.startswith("past_key_values.")}
    return sess.run(["logits"], feeds)[0]


def _within(got: np.ndarray, want: np.ndarray, target: str, what: str) -> None:
    diff, cos, _ = TOLERANCE[target]
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    cosine = float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w)))
    assert np.abs(got - want).max() <= diff and cosine >= cos, (what, float(np.abs(got - want).max()), cosine)


@pytest.mark.slow
@pytest.mark.parametrize("deployment", PAIRS, indirect=True, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_baked_engines_match_pytorch(deployment, adapters, request):
    family, target = request.node.callspec.params["deployment"]
    task_type, _, labels = FAMILIES[family]
    base, tasks = adapters[family]
    dep = deployment["patched"]
    manifest = read_manifest(dep)
    ids = _ids(manifest["base"]["vocab_size"])
    for name, path in tasks.items():
        _, merged = peft_reference(base, path, task_type, labels)
        with torch.no_grad():
            want = merged(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids))
                          ).logits.numpy()
        entry = manifest["tasks"][name]
        _within(_run(dep / entry["engine"], entry["engine_io"], ids), want, target, f"{name} vs PyTorch")


@pytest.mark.slow
@pytest.mark.parametrize("deployment", PAIRS, indirect=True, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_patched_engines_equal_re_exported_ones(deployment, request):
    """The base engine patched with W0 + s·B·A and re-encoded, vs the merged model exported again: fp32 within
    1e-5; quantized and fp16 within the target's tolerance (their weights are the same bytes: the patcher checks
    it reproduces the quantizer's encoding exactly)."""
    _, target = request.node.callspec.params["deployment"]
    patched, reexported = read_manifest(deployment["patched"]), read_manifest(deployment["reexported"])
    ids = _ids(patched["base"]["vocab_size"])
    for name, entry in patched["tasks"].items():
        report = json.loads((deployment["patched"] / "report.json").read_text())["tasks"][name]
        assert report["bake"] == "patched", report["bake"]
        a = _run(deployment["patched"] / entry["engine"], entry["engine_io"], ids)
        other = reexported["tasks"][name]
        b = _run(deployment["reexported"] / other["engine"], other["engine_io"], ids)
        if target == "cpu-fp32":
            assert np.abs(a - b).max() <= 1e-5, (name, float(np.abs(a - b).max()))
        else:
            _within(a, b, target, f"{name} patched vs re-exported")


@pytest.mark.slow
@pytest.mark.parametrize("deployment", PAIRS, indirect=True, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_swap_and_branches_match_the_baked_engines(deployment, request):
    """The runtime rebuilding weights (where the target has a swap graph) and as LoRA branches: each task's
    logits vs its baked engine — fp32 within 1e-5, others the target's tolerance."""
    _, target = request.node.callspec.params["deployment"]
    dep = deployment["patched"]
    manifest = read_manifest(dep)
    ids = _ids(manifest["base"]["vocab_size"])
    modes = [False, True] if manifest.get("swap") else [True]
    for unmerged in modes:
        rt = Runtime.open(dep, threads=1, unmerged=unmerged)
        for name, entry in manifest["tasks"].items():
            got = rt.run(input_ids=ids, task=name)["logits"]
            want = _run(dep / entry["engine"], entry["engine_io"], ids)
            if target == "cpu-fp32":
                assert np.abs(got - want).max() <= 1e-4, (rt.mode, name, float(np.abs(got - want).max()))
            else:
                _within(got, want, target, f"{rt.mode} {name} vs baked")


@pytest.mark.slow
@pytest.mark.parametrize("deployment", PAIRS, indirect=True, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_an_export_re_run_rewrites_the_same_bytes(deployment):
    first, again = deployment["patched"], deployment["rerun"]
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel not in ("report.json", "report.md"):  # timings differ; everything else is byte for byte
            assert filecmp.cmp(first / rel, again / rel, shallow=False), rel
