"""Mean-pooling classifiers: trained, recorded, merged into a folder transformers loads, exported, baked,
swapped and mixed-batched, each checked against the mean computed here from the base's own hidden states."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, load_task_model, make_labelled_adapters, make_peft_adapter
from test_train import _sentiment_tsv

from edgelora.adapter import load_adapter
from edgelora.base import bundled_base_path, default_pooling
from edgelora.format.delta import parse_delta
from edgelora.modeling_edgelora import BertForSequenceClassificationMeanPooling
from edgelora.train import TrainConfig, train
from edgelora.validate import infer_head


def _sentence_transformer(tiny: Path, dst: Path, mean: bool = True) -> Path:
    """The tiny BERT as a sentence-transformers folder (modules.json + 1_Pooling), mean or CLS pooling."""
    shutil.copytree(tiny, dst)
    (dst / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}))
    return dst


@pytest.fixture(scope="module")
def st_base(tiny_dir, tmp_path_factory) -> Path:
    return _sentence_transformer(tiny_dir("bert"), tmp_path_factory.mktemp("st") / "base")


@pytest.fixture(scope="module")
def mean_adapter(st_base, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An adapter trained by `edgelora train` on the sentence-transformers base (mean pooling by default)."""
    root = tmp_path_factory.mktemp("mean")
    cfg = TrainConfig(r=4, alpha=8, batch_size=16, epochs=2, lr=5e-3, seed=3)
    result = train("sequence-classification", _sentiment_tsv(root / "train.tsv", 64, 0), root / "adapter", cfg,
                   base=st_base, progress=False, command="test")
    return root / "adapter", result.model.eval()


def _by_hand(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """classifier(Σ mask·h / Σ mask) from the base's last hidden state, computed here in float64."""
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
    m = mask.double().numpy()[:, :, None]
    pooled = (hidden * m).sum(1) / m.sum(1)
    w, b = model.classifier.weight.double().numpy(), model.classifier.bias.double().numpy()
    return pooled @ w.T + b


def _padded_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(6, 100, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_default_pooling_follows_the_base(tiny_dir, tmp_path, st_base):
    assert default_pooling(bundled_base_path()) == "mean"  # all-MiniLM-L6-v2: modules.json + 1_Pooling mean
    assert default_pooling(tiny_dir("bert")) == "cls"  # a bare HF folder keeps transformers' head
    assert default_pooling(st_base) == "mean"
    assert default_pooling(_sentence_transformer(tiny_dir("bert"), tmp_path / "cls", mean=False)) == "cls"
    assert default_pooling(_sentence_transformer(tiny_dir("llama"), tmp_path / "llama")) == "cls"  # not a BERT


def test_mean_adapter_is_recorded_reloads_and_merges_to_a_folder_transformers_loads(st_base, mean_adapter,
                                                                                   tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path, trained = mean_adapter
    record = json.loads((path / "edgelora.json").read_text())
    assert record["pooling"] == "mean" and record["labels"] == ["neg", "pos"]
    assert sorted(load_adapter(path).replacements) == ["classifier.bias", "classifier.weight"]
    assert json.loads(cli("inspect", path, "--json").out)["pooling"] == "mean"
    ids, mask = _padded_inputs()
    # the trained model is the mean of the token states through the classifier, padding left out
    with torch.no_grad():
        got = trained(input_ids=ids, attention_mask=mask).logits.double().numpy()
    merged_ref = PeftModel.from_pretrained(
        BertForSequenceClassificationMeanPooling.from_pretrained(str(st_base), num_labels=2), str(path)
    ).merge_and_unload().eval()
    np.testing.assert_allclose(got, _by_hand(merged_ref, ids, mask), atol=1e-5)
    # `edgelora merge` writes a folder whose class comes with it: transformers loads the same forward
    assert cli("merge", "--base", st_base, "--adapter", path, "-o", tmp_path / "m").code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_edgelora.")
    with pytest.raises(ValueError, match="trust_remote_code"):  # never transformers' CLS head on these weights
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m"))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m"), trust_remote_code=True).eval()
    assert type(loaded).__name__ == "MergedBertMeanPooling"
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        np.testing.assert_allclose(loaded(input_ids=ids, attention_mask=mask).logits.double().numpy(),
                                   _by_hand(merged_ref, ids, mask), atol=1e-5)


def test_imported_peft_adapters_keep_cls(st_base, tmp_path):
    """An adapter edgelora did not train says nothing about pooling: it keeps transformers' CLS head, even on
    a base whose own pooling is mean."""
    path = make_peft_adapter(st_base, tmp_path / "peft", num_labels=2, task_type="SEQ_CLS",
                             target_modules=["query", "value"], r=4, lora_alpha=8)
    assert infer_head(load_adapter(path), st_base, "sequence-classification").pooling == "cls"


@pytest.fixture(scope="module", params=["auto", "reexport"])
def deployment(request, st_base, mean_adapter, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """One cpu-fp32 folder with a mean task and a CLS task side by side; task engines patched into the base
    engine (auto) or traced again from the merged model (reexport)."""
    from edgelora.cli import main

    root = tmp_path_factory.mktemp("dep")
    adapters = {"mean": mean_adapter[0], **make_labelled_adapters(st_base, root, {"cls": ["a", "b", "c"]})}
    args = ["export", "--base", str(st_base), "--target", "cpu-fp32", "-o", str(root / "out"), "-q",
            "--bake", request.param]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return root / "out", adapters


def _references(st_base: Path, adapters: dict[str, Path], ids: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, np.ndarray]:
    """Each task's logits from the real peft library's merge, mean computed by hand / transformers' CLS head."""
    from peft import PeftModel

    mean = PeftModel.from_pretrained(BertForSequenceClassificationMeanPooling.from_pretrained(
        str(st_base), num_labels=2), str(adapters["mean"])).merge_and_unload().eval()
    cls = PeftModel.from_pretrained(load_task_model(st_base, "SEQ_CLS", num_labels=3),
                                    str(adapters["cls"])).merge_and_unload().eval()
    with torch.no_grad():
        return {"mean": _by_hand(mean, ids, mask),
                "cls": cls(input_ids=ids, attention_mask=mask).logits.double().numpy()}


def test_export_bakes_swaps_and_mixes_mean_and_cls_tasks(st_base, deployment):
    import onnxruntime as ort

    from edgelora.runtime import Runtime

    folder, adapters = deployment
    manifest = json.loads((folder / "manifest.json").read_text())
    bakes = {n: t["bake"].split(":")[0] for n, t in json.loads((folder / "report.json").read_text())["tasks"].items()}
    assert set(bakes.values()) in ({"patched"}, {"re-exported"}), bakes
    assert {n: t["pooling"] for n, t in manifest["tasks"].items()} == {"mean": "mean", "cls": "cls"}
    delta = {n: parse_delta((folder / t["delta"]).read_bytes(), n) for n, t in manifest["tasks"].items()}
    assert delta["mean"].pooling == "mean" and delta["cls"].pooling == "cls"
    ids, mask = _padded_inputs(1)
    ref = _references(st_base, adapters, ids, mask)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for name, task in manifest["tasks"].items():  # the baked engines
        sess = ort.InferenceSession(str(folder / task["engine"]), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["logits"], feeds)[0], ref[name], atol=1e-4, err_msg=name)
    for unmerged in (False, True):  # weights swapped in place; LoRA branches fed A, B
        rt = Runtime.open(folder, threads=2, unmerged=unmerged)
        for name in ("mean", "cls", "mean"):
            rt.activate(name)
            np.testing.assert_allclose(rt.run(**feeds)["logits"], ref[name], atol=1e-4, err_msg=(name, unmerged))
        mixed = rt.run(tasks=["mean", "cls", "mean"], **feeds)["logits"]
        np.testing.assert_allclose(mixed[[0, 2], :2], ref["mean"][[0, 2]], atol=1e-4)
        assert np.isneginf(mixed[[0, 2], 2]).all()  # the mean task has two labels, the CLS task three
        np.testing.assert_allclose(mixed[1], ref["cls"][1], atol=1e-4)


def test_mean_pooling_bad_input(tiny_dir, st_base, mean_adapter, tmp_path, cli):
    data = _sentiment_tsv(tmp_path / "train.tsv", 16, 0)
    # a family whose classifier cannot read the mean: one line before any training
    res = cli("train", "--base", tiny_dir("llama"), "--train", data, "--pooling", "mean", "-o", tmp_path / "o",
              "--max-steps", "1", "-q")
    assert_one_line_error(res, "mean pooling", "--pooling cls")
    assert not (tmp_path / "o").exists()
    # a record whose pooling is neither: named, with the field
    bad = tmp_path / "bad"
    shutil.copytree(mean_adapter[0], bad)
    record = json.loads((bad / "edgelora.json").read_text())
    (bad / "edgelora.json").write_text(json.dumps({**record, "pooling": "max"}))
    res = cli("export", "--base", st_base, "--adapter", f"t={bad}", "--target", "cpu-fp32", "-o", tmp_path / "e",
              "-q")
    assert_one_line_error(res, "edgelora.json", "pooling")
    assert not (tmp_path / "e").exists()


def test_a_mean_delta_says_so_and_is_refused_without_its_classifier(deployment, tmp_path):
    """A mean delta is format 4 (a runtime that knows no pooling refuses it rather than read pooler_output);
    its pooling and format must agree."""
    from edgelora.errors import DeltaError
    from edgelora.format.delta import save_float32_safetensors
    from edgelora.format.safetensors import parse

    folder, _ = deployment
    data = (folder / "tasks" / "mean" / "delta.safetensors").read_bytes()
    tensors, meta = parse(data, "x", DeltaError)
    assert meta["format"] == "4" and meta["pooling"] == "mean"
    for broken, needle in (({**meta, "format": "3"}, "pooling"), ({**meta, "pooling": "max"}, "pooling")):
        save_float32_safetensors(tensors, tmp_path / "d.safetensors", broken)
        with pytest.raises(DeltaError, match=needle):
            parse_delta((tmp_path / "d.safetensors").read_bytes(), "d")
    no_head = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    save_float32_safetensors(no_head, tmp_path / "d.safetensors", meta)
    with pytest.raises(DeltaError, match="classifier"):
        parse_delta((tmp_path / "d.safetensors").read_bytes(), "d")
