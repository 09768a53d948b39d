"""The device bundle (`edgelora pack`): only what the runtime reads, and the runtime opened from it alone
computes what it computes on the whole deployment folder, bit for bit, in every mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FAMILIES, schema_validator

from edgelora.format.layout import read_manifest_json as read_manifest
from edgelora.runtime import Runtime


@pytest.fixture(scope="module")
def bundles(exported, tmp_path_factory):
    """family -> its fp32 deployment's device bundle, written through the CLI entry point."""
    from edgelora.cli import main

    out = {}
    for family, dep in exported.items():
        dst = tmp_path_factory.mktemp(f"bundle_{family}") / "b"
        try:
            main(["pack", str(dep), "-o", str(dst)])
        except SystemExit as exc:
            assert exc.code in (0, None)
        out[family] = dst
    return out


def _ids(vocab: int, batch: int = 2, seq: int = 9) -> np.ndarray:
    return np.random.default_rng(7).integers(3, vocab, size=(batch, seq), dtype=np.int64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_bundle_holds_only_what_the_runtime_reads(family, exported, bundles, cli):
    bundle = bundles[family]
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    manifest = read_manifest(bundle)
    assert not any(f.startswith("base/task-") or f == "base/model.onnx" or f.endswith(".onnx_adapter")
                   for f in files), files
    assert set(files) == {*manifest["files"], "manifest.json"}
    assert not [e for e in schema_validator().iter_errors(manifest)]
    assert cli("verify", bundle).code == 0
    full = sum(p.stat().st_size for p in exported[family].rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) < full


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_runtime_from_the_bundle_alone_computes_what_it_does_on_the_folder(family, exported, bundles,
                                                                               tmp_path):
    """Every task after swaps (or as branches, decoders' default), a mixed-task batch, greedy generation: equal
    bit for bit to the runtime on the whole folder (which test_runtime holds to the baked engines and peft).
    The folder is moved away first: the bundle must not reach back into it."""
    folder = shutil.move(str(exported[family]), tmp_path / "elsewhere")
    try:
        rt_b = Runtime.open(bundles[family], threads=1)
        rt_f = Runtime.open(folder, threads=1)
        assert rt_b.mode == rt_f.mode and rt_b.tasks == rt_f.tasks
        ids = _ids(rt_b.manifest.base.vocab_size)
        for task in ["t1", "t2", None, "t2"]:
            rt_b.activate(task)
            rt_f.activate(task)
            got, want = rt_b.run(input_ids=ids), rt_f.run(input_ids=ids)
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got), (family, task)
        rows = ["t2", "t1"]
        mixed = [rt.run(input_ids=ids, tasks=rows)["logits"] for rt in (rt_b, rt_f)]
        assert np.array_equal(*mixed)
        if rt_b.kind == "causal-lm":
            assert rt_b.generate(ids[0], 6, task="t1") == rt_f.generate(ids[0], 6, task="t1")
    finally:
        shutil.move(str(folder), exported[family])


def test_a_device_bundle_of_the_examples_is_the_base_engine_and_the_deltas(tmp_path, cli):
    """W1 (the bundled base and both example adapters, cpu-fp32): the bundle is at most the base engine plus the
    deltas plus 2% (the runtime's graphs, the tokenizer, the manifest), and classifies as the folder does."""
    dep = tmp_path / "dep"
    assert cli("export", "-o", dep, "-q").code == 0
    res = cli("pack", dep, "-o", tmp_path / "b", "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    assert info["vs_base_and_deltas"] <= 1.02, info
    texts = ["a gorgeous, witty, seductive movie", "Stocks fell as oil prices rose"]
    for task in ("sst2", "agnews"):
        assert Runtime.open(tmp_path / "b").classify(texts, task=task) == Runtime.open(dep).classify(texts, task=task)
