"""The committed example adapters and the CLI on the real bundled base (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED_DATA, load_task_model

from edgelora.base import bundled_base_path, fingerprint
from edgelora.data import read_classification

EXAMPLES = REPO / "examples" / "adapters"


def _peft_merged(adapter, num_labels: int) -> torch.nn.Module:
    """The real peft library's merge of an example adapter, on the class its head needs: transformers' CLS head,
    or, for an adapter whose edgelora.json says mean pooling, edgelora's mean-pooling BERT (same weights)."""
    from peft import PeftModel

    from edgelora.modeling_edgelora import BertForSequenceClassificationMeanPooling

    pooling = json.loads((adapter / "edgelora.json").read_text()).get("pooling", "cls")
    if pooling == "mean":
        base = BertForSequenceClassificationMeanPooling.from_pretrained(str(bundled_base_path()),
                                                                       num_labels=num_labels)
    else:
        base = load_task_model(bundled_base_path(), "SEQ_CLS", num_labels=num_labels)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def test_help_lists_every_command(cli):
    res = cli("--help")
    assert res.code == 0
    for command in ("train", "merge", "inspect", "export", "bench"):
        assert f"  {command} " in res.out


@pytest.mark.parametrize("task, labels", [("sst2", ["negative", "positive"]),
                                          ("agnews", ["Business", "Sci/Tech", "Sports", "World"])])
def test_example_adapter_inspects_and_is_small(task, labels, cli):
    res = cli("inspect", EXAMPLES / task, "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    assert info["rank"] == 8 and info["alpha"] == 16 and info["scale"] == 2.0
    assert info["targets"] == ["query", "value"] and info["lora_modules"] == 12
    assert info["modules_to_save"] == ["classifier.bias", "classifier.weight"]
    assert info["pooling"] == "mean"  # the bundled base is a sentence-transformers model: its own pooling
    assert info["base_fingerprint"] == fingerprint(bundled_base_path())
    assert info["labels"] == labels
    assert info["size_bytes"] < 1_000_000
    assert info["metrics"]["eval_accuracy"] > 0.8
    assert info["trainable_parameters"] == 73_728 + 385 * len(labels)


def test_example_adapter_merge_matches_peft_on_the_real_base(tmp_path, cli):
    res = cli("merge", "--adapter", EXAMPLES / "sst2", "-o", tmp_path / "m", "--json")
    assert res.code == 0, res.err
    ours = load_task_model(tmp_path / "m", "SEQ_CLS", trust_remote_code=True)  # a mean head's class is in the folder
    reference = _peft_merged(EXAMPLES / "sst2", num_labels=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    batch = tok(["a gorgeous, witty, seductive movie", "the plot is a dull mess", "it is what it is"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = ours(**batch).logits, reference(**batch).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert ours.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "dev.tsv").is_file(), reason="needs ../shared/data")
def test_merged_sst2_example_classifies_dev_sentences(tmp_path, cli):
    assert cli("merge", "--adapter", EXAMPLES / "sst2", "-o", tmp_path / "m").code == 0
    from transformers import AutoTokenizer

    model = load_task_model(tmp_path / "m", "SEQ_CLS", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    rows = read_classification(SHARED_DATA / "sst2" / "dev.tsv")[:400]
    with torch.inference_mode():
        logits = model(**tok([r.text for r in rows], padding=True, return_tensors="pt")).logits
    accuracy = (logits.argmax(-1) == torch.tensor([int(r.label) for r in rows])).float().mean().item()
    assert accuracy >= 0.85


def test_default_export_is_the_main_job(tmp_path, cli, monkeypatch):
    """`edgelora export` with no adapters: bundled base + both example adapters, verified, then benched."""
    monkeypatch.chdir(tmp_path)
    res = cli("export", "-q", "--json", "--eval", f"sst2={REPO / 'examples/data/sst2-dev-500.tsv'}")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    dep = tmp_path / "out" / "cpu-fp32"
    manifest = json.loads((dep / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"sst2", "agnews"}
    assert manifest["base"]["fingerprint"] == fingerprint(bundled_base_path())
    assert manifest["tasks"]["agnews"]["labels"] == ["Business", "Sci/Tech", "Sports", "World"]
    for name in ("sst2", "agnews"):
        assert report["tasks"][name]["max_abs_diff"] <= 1e-4 and report["tasks"][name]["agreement"] == 1.0
    sst2 = report["tasks"]["sst2"]
    assert sst2["accuracy"] == sst2["torch_accuracy"] and sst2["accuracy"] >= 0.85
    # the fused encoder packs q, k, v into one weight: the map records the slice of each target
    assert all(loc["slice"] is not None for loc in manifest["name_map"]["modules"].values())

    # run elsewhere than the adapters, the manifest records only their folders' names: bench is told where they are
    assert manifest["tasks"]["sst2"]["adapter_path"] == "sst2"
    res = cli("bench", dep, "--rounds", "1", "--json", "--adapter", f"sst2={EXAMPLES / 'sst2'}",
              "--adapter", f"agnews={EXAMPLES / 'agnews'}")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    engines = result["engines"]
    assert {"base", "sst2", "agnews", "sst2 (PEFT unmerged, PyTorch)", "sst2 (runtime, swap)"} <= set(engines)
    assert all(e["median_ms"] > 0 for e in engines.values())
    assert result["swap"]["activate_median_ms"] > 0 and result["swap"]["open_session_median_ms"] > 0

    # the on-device runtime on the same folder: text in, the example's class out, equal to the baked engine
    res = cli("run", dep, "--task", "sst2", "--text", "a gorgeous, witty, seductive movie",
              "--text", "the plot is a dull mess", "--json")
    assert res.code == 0, res.err
    assert [r["label"] for r in json.loads(res.out)["results"]] == ["positive", "negative"]
    _runtime_matches_baked(dep, "sst2", max_abs_diff=1e-5)


def _runtime_matches_baked(dep, task, max_abs_diff):
    """Runtime after swaps vs the task's baked engine on the shipped SST-2 sample: same argmax on every
    row, logits within ``max_abs_diff``."""
    import numpy as np
    import onnxruntime as ort

    from edgelora.runtime import Runtime

    rt = Runtime.open(dep, threads=2)
    for name in (*rt.tasks, task):  # arrive at the task through the others
        rt.activate(name)
    engine = ort.InferenceSession(str(dep / rt.manifest.tasks[task].engine), providers=["CPUExecutionProvider"])
    texts = [e.text for e in read_classification(REPO / "examples/data/sst2-dev-500.tsv")]
    for i in range(0, len(texts), 100):
        enc = rt.tokenizer.encode(texts[i:i + 100])
        got, ref = rt.run(**enc)["logits"], engine.run(None, enc)[0]
        assert np.array_equal(got.argmax(1), ref.argmax(1))
        assert np.abs(got - ref).max() <= max_abs_diff


def test_int8_export_of_the_examples_keeps_accuracy(tmp_path, cli):
    """cpu-int8 on the real base: the export's own checks pass (bundled tolerance), the engine is about
    a quarter of fp32, and on the shipped SST-2 sample it stays within half a point of PyTorch."""
    out = tmp_path / "int8"
    res = cli("export", "--target", "cpu-int8", "-o", out, "-q", "--json",
              "--eval", f"sst2={REPO / 'examples/data/sst2-dev-500.tsv'}")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    sst2 = report["tasks"]["sst2"]
    assert abs(sst2["accuracy"] - sst2["torch_accuracy"]) <= 0.005 + 1e-9
    assert sst2["cosine"] >= 0.98 and sst2["agreement"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    fp32_params = 22_713_986 * 4
    from edgelora.export import engine_size

    assert engine_size(out / manifest["base"]["engine"]) < 0.3 * fp32_params
    assert report["tasks"]["sst2"]["bake"] == "patched"  # the int8 base engine with re-quantized q, v
    # the runtime re-quantizes the swapped columns with the quantizer's recipe: same classes as the
    # baked int8 engine on every row, logits within the target's tolerance
    recipes = {w["recipe"] for w in manifest["swap"]["weights"].values()}
    assert manifest["swap"]["weights"] and recipes == {"int8-pairsafe"}
    _runtime_matches_baked(out, "sst2", max_abs_diff=manifest["target"]["tolerance"]["max_abs_diff"])
