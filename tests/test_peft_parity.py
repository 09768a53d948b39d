"""Acceptance 1: `edgelora merge` == peft's merge_and_unload, for adapters made by the real peft library.

Families: BERT, GPT-2 (Conv1D, fan_in_fan_out), LLaMA, Qwen2. Features: rsLoRA, rank_pattern,
alpha_pattern, modules_to_save (explicit and the SEQ_CLS head), regex targets, layers_to_transform,
embedding LoRA on a tied embedding, bias="all", lora_bias, DoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_task_model, make_peft_adapter, model_output, peft_reference

CASES = {
    "bert-seqcls-qv": ("bert", 3, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-rslora-patterns-regex": ("bert", None, dict(
        task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16, use_rslora=True,
        target_modules=r".*\.(query|key|value|dense)",
        rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 5})),
    "bert-bias-all": ("bert", None, dict(task_type="FEATURE_EXTRACTION", r=4, target_modules=["query"], bias="all")),
    "gpt2-conv1d": ("gpt2", None, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "llama-all-linear-patterns": ("llama", None, dict(
        task_type="CAUSAL_LM", r=8, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"mlp.down_proj": 4}, alpha_pattern={"o_proj": 4})),
    "llama-layers-modules-to-save": ("llama", None, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
        modules_to_save=["lm_head"])),
    "qwen2-qv-rslora": ("qwen2", None, dict(
        task_type="CAUSAL_LM", r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "qwen2-seqcls-score": ("qwen2", 4, dict(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "qwen2-lora-bias": ("qwen2", None, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"])),
    "qwen2-dora": ("qwen2", None, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-dora-conv1d": ("gpt2", None, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True)),
}


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft_adapters")
    return {
        name: make_peft_adapter(tiny_dir(family), root / name, num_labels=labels, **kw)
        for name, (family, labels, kw) in CASES.items()
    }


def _inputs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 100, (3, 11), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(case, adapters, tiny_dir, tmp_path, cli):
    family, num_labels, kw = CASES[case]
    base = tiny_dir(family)
    out = tmp_path / "merged"
    res = cli("merge", "--base", base, "--adapter", adapters[case], "-o", out)
    assert res.code == 0, res.err

    ours = load_task_model(out, kw["task_type"])  # a plain transformers load of our folder
    unmerged, reference = peft_reference(base, adapters[case], kw["task_type"], num_labels)
    plain = load_task_model(base, kw["task_type"], **({"num_labels": num_labels} if num_labels else {}))
    x = _inputs()
    got, want = model_output(ours, x), model_output(reference, x)
    assert (got - want).abs().max().item() <= 1e-5
    # merged == unmerged (the LoRA forward pass), up to fp32 rounding of a different summation order
    assert (got - model_output(unmerged, x)).abs().max().item() <= 1e-4
    # and the adapter really changes the model: the test would fail if merge were a no-op
    if num_labels is None:
        assert (got - model_output(plain, x)).abs().max().item() > 1e-3


def test_fan_in_fan_out_mismatch_is_corrected_with_a_warning(tiny_dir, tmp_path, cli):
    """PEFT silently flips fan_in_fan_out for Conv1D; edgelora does the same math but says so."""
    base = tiny_dir("gpt2")
    adapter = make_peft_adapter(base, tmp_path / "a", task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["fan_in_fan_out"] = False  # PEFT rewrites the flag when it saves; a hand-written config may not
    cfg_file.write_text(json.dumps(cfg))
    res = cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert res.code == 0, res.err
    assert "warning:" in res.err and "fan_in_fan_out" in res.err
    _, reference = peft_reference(base, adapter, "CAUSAL_LM")
    x = _inputs()
    got = model_output(load_task_model(tmp_path / "m", "CAUSAL_LM"), x)
    assert (got - model_output(reference, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapter_is_merged_in_fp32(dtype, tiny_dir, tmp_path, cli):
    """A bf16/fp16 adapter merges into an fp32 base with the fp32 product of its (upcast) A and B."""
    from safetensors.torch import load_file, save_file

    base = tiny_dir("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    f = adapter / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f))
    assert cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m").code == 0
    _, reference = peft_reference(base, adapter, "CAUSAL_LM")  # peft upcasts the half weights too
    x = _inputs()
    got = model_output(load_task_model(tmp_path / "m", "CAUSAL_LM"), x)
    assert (got - model_output(reference, x)).abs().max().item() <= 1e-5


def test_lora_on_a_tied_embedding_unties_it_and_matches_the_lora_forward(tiny_dir, tmp_path, cli):
    """GPT-2 ties wte and lm_head. PEFT's LoRA forward adapts only the embedding lookup, but its
    merge_and_unload writes ΔW into the shared tensor, so the head changes too (a different model).
    edgelora unties them: the merged folder computes what the adapter computes, and says so."""
    base = tiny_dir("gpt2")
    adapter = make_peft_adapter(base, tmp_path / "a", task_type="CAUSAL_LM", r=4, lora_alpha=4,
                                target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    res = cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert res.code == 0, res.err
    assert "tied" in res.err
    unmerged, peft_merged = peft_reference(base, adapter, "CAUSAL_LM")
    ours = load_task_model(tmp_path / "m", "CAUSAL_LM")
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()
    x = _inputs()
    got = model_output(ours, x)
    assert (got - model_output(unmerged, x)).abs().max().item() <= 1e-4
    assert (model_output(peft_merged, x) - model_output(unmerged, x)).abs().max().item() > 1e-2  # PEFT's bug
