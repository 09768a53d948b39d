"""`edgelora train`: the paper's recipe via PEFT, PEFT-loadable output, the record, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import load_task_model, model_output, tree

from edgelora import names
from edgelora.adapter import load_adapter
from edgelora.base import fingerprint, load_model
from edgelora.train import TrainConfig, lora_config, tokenize_lm, train


def _sentiment_tsv(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    good = ["great", "wonderful", "superb", "delightful", "excellent", "moving"]
    bad = ["awful", "terrible", "boring", "dreadful", "painful", "dull"]
    rows = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(good if label else bad)
        rows.append(f"a {word} {rng.choice(['film', 'movie', 'story', 'show'])}\t{'pos' if label else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_trained_classifier_reloads_in_peft_to_identical_logits(tiny_dir, tmp_path, cli):
    from peft import PeftModel

    base = tiny_dir("bert")
    data = _sentiment_tsv(tmp_path / "train.tsv", 64, 0)
    dev = _sentiment_tsv(tmp_path / "dev.tsv", 32, 1)
    cfg = TrainConfig(r=4, alpha=8, batch_size=16, epochs=2, lr=5e-3, seed=3)
    result = train("sequence-classification", data, tmp_path / "out", cfg, base=base, eval_file=dev,
                   progress=False, command="test")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "edgelora.json"]
    # PEFT loads our folder and computes exactly what the trained model computes
    x = torch.randint(6, 100, (4, 12))
    reloaded = PeftModel.from_pretrained(load_task_model(base, "SEQ_CLS", num_labels=2), str(out)).eval()
    result.model.eval()
    assert torch.equal(model_output(reloaded, x), model_output(result.model, x))
    # The recipe: W_q, W_v by default, head saved as modules_to_save, rank and alpha as asked
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg_json["target_modules"]) == ["query", "value"]
    assert cfg_json["r"] == 4 and cfg_json["lora_alpha"] == 8 and cfg_json["task_type"] == "SEQ_CLS"
    adapter = load_adapter(out)
    assert sorted(adapter.replacements) == ["classifier.bias", "classifier.weight"]
    # The record: fingerprint of the base, labels, one history entry per epoch with validation metrics
    record = adapter.record
    assert record.base_fingerprint == fingerprint(base)
    assert record.labels == ("neg", "pos")
    assert [h["epoch"] for h in record.metrics["history"]] == [1, 2]
    assert 0.0 <= record.metrics["history"][-1]["eval_accuracy"] <= 1.0
    assert record.command == "test"
    # and `edgelora merge` of the trained adapter equals the PEFT model
    assert cli("merge", "--base", base, "--adapter", out, "-o", tmp_path / "m").code == 0
    merged = load_task_model(tmp_path / "m", "SEQ_CLS")
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert (model_output(merged, x) - model_output(reloaded, x)).abs().max() <= 1e-5


def test_lora_starts_at_the_base_model(tiny_dir):
    """B = 0 at init, A random: ΔW = 0, so step 0 computes exactly the base model (paper §4.1)."""
    from peft import get_peft_model

    base = tiny_dir("llama")
    model = load_model(base, "causal-lm")
    x = torch.randint(6, 100, (2, 9))
    before = model_output(model, x)
    peft_model = get_peft_model(model, lora_config(TrainConfig(r=4), "causal-lm", model))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(torch.count_nonzero(p) == 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.std() > 0 for n, p in lora.items() if "lora_A" in n)
    modules = {names.parse_lora_key(n.removeprefix("base_model.model.")).module for n in lora}
    assert {names.short_name(m) for m in modules} == {"q_proj", "v_proj"}  # W_q, W_v (paper §7.1)
    assert torch.equal(model_output(peft_model, x), before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_training_learns_completions(family, tiny_dir, tmp_path):
    base = tiny_dir(family)
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}{i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(r=8, alpha=16, batch_size=6, epochs=40, lr=2e-2, seed=0, warmup_ratio=0.0)
    result = train("causal-lm", tmp_path / "train.jsonl", tmp_path / "out", cfg, base=base,
                   eval_file=tmp_path / "train.jsonl", progress=False)
    history = result.history
    assert history[-1]["eval_loss"] < 0.5 * history[0]["eval_loss"]
    adapter = load_adapter(tmp_path / "out")
    assert adapter.config.task_type == "CAUSAL_LM"
    expected = {"llama": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}}[family]  # PEFT's W_q,W_v table
    assert {m.rsplit(".", 1)[-1] for m in adapter.modules} == expected


def test_prompt_tokens_carry_no_loss(tiny_dir):
    from transformers import AutoTokenizer

    from edgelora.data import LMExample

    tok = AutoTokenizer.from_pretrained(str(tiny_dir("llama")))
    [(ids, labels)] = tokenize_lm(tok, [LMExample("abc", "de")], 32)
    assert labels[:3] == [-100, -100, -100]
    assert labels[3:] == ids[3:] and ids[-1] == tok.eos_token_id
    # plain text is cut into blocks that are all trained on
    blocks = tokenize_lm(tok, [LMExample("", "x" * 70)], 32)
    assert [len(b[0]) for b in blocks] == [32, 32, 7] and all(-100 not in b[1] for b in blocks)


def test_val_fraction_split_and_label_order(tiny_dir, tmp_path):
    data = _sentiment_tsv(tmp_path / "train.tsv", 40, 0)
    result = train("sequence-classification", data, tmp_path / "out",
                   TrainConfig(r=2, batch_size=8, max_steps=2, seed=1), base=tiny_dir("bert"),
                   val_fraction=0.25, labels=["pos", "neg"], label_names=["positive", "negative"], progress=False)
    record = load_adapter(tmp_path / "out").record
    assert record.labels == ("positive", "negative")  # display names, in the order --labels gave
    assert record.metrics["eval_examples"] == 10 and record.metrics["train_examples"] == 30
    assert result.history[-1]["steps"] == 2


def _bad_train(cli, tmp_path, *args):
    res = cli("train", "-o", tmp_path / "out", *args)
    assert res.code == 2, res.err
    assert len(res.err.strip().splitlines()) == 1 and res.err.startswith("error: ")
    assert not (tmp_path / "out").exists()
    return res.err


def test_train_bad_input(tiny_dir, tmp_path, cli):
    base = tiny_dir("bert")
    good = _sentiment_tsv(tmp_path / "train.tsv", 20, 0)
    err = _bad_train(cli, tmp_path, "--train", tmp_path / "missing.tsv", "--base", base)
    assert "missing.tsv" in err and "does not exist" in err
    (tmp_path / "nocol.tsv").write_text("words\tlabel\nhello\t1\n")
    err = _bad_train(cli, tmp_path, "--train", tmp_path / "nocol.tsv", "--base", base)
    assert "nocol.tsv" in err and "--text-column" in err
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nhello\tmaybe\n")
    err = _bad_train(cli, tmp_path, "--train", good, "--eval", tmp_path / "dev.tsv", "--base", base)
    assert "maybe" in err and "dev.tsv" in err
    (tmp_path / "ragged.tsv").write_text("sentence\tlabel\nhello\t1\textra\n")
    err = _bad_train(cli, tmp_path, "--train", tmp_path / "ragged.tsv", "--base", base)
    assert "line 2" in err
    err = _bad_train(cli, tmp_path, "--train", good, "--base", base, "--r", "0")
    assert "--r" in err
    err = _bad_train(cli, tmp_path, "--train", good, "--base", base, "--targets", "nonexistent_proj",
                     "--max-steps", "1")
    assert "nonexistent_proj" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    res = cli("train", "-o", tmp_path / "out", "--train", good, "--base", base)
    assert res.code == 2 and "--force" in res.err and tree(tmp_path / "out") == ["x"]


def test_loraplus_gives_b_matrices_the_larger_learning_rate(tiny_dir):
    from peft import get_peft_model

    from edgelora.train import make_optimizer

    model = load_model(tiny_dir("llama"), "causal-lm")
    cfg = TrainConfig(r=4, lr=1e-3, loraplus_ratio=16)
    peft_model = get_peft_model(model, lora_config(cfg, "causal-lm", model))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = make_optimizer(peft_model, params, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in peft_model.named_parameters():
        if "lora_A" in name:
            assert lr_of[id(p)] == pytest.approx(1e-3)
        elif "lora_B" in name:
            assert lr_of[id(p)] == pytest.approx(16e-3)
    plain = make_optimizer(peft_model, params, TrainConfig(r=4, lr=1e-3))
    assert [g["lr"] for g in plain.param_groups] == [1e-3]
