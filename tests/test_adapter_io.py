"""PEFT folders in and out: lossless round trip, config fields, hashes, pickles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_task_model, make_peft_adapter, model_output
from safetensors.torch import load_file, save_file

from edgelora.adapter import AdapterConfig, load_adapter, save_adapter
from edgelora.errors import EdgeloraError

ROUND_TRIP = {
    "bert-seqcls": ("bert", 3, dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], use_rslora=True)),
    "gpt2-dora-embedding": ("gpt2", None, dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "wte"],
                                               fan_in_fan_out=True)),
    "qwen2-patterns-bias": ("qwen2", None, dict(task_type="CAUSAL_LM", r=8, lora_bias=True,
                                                target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                                alpha_pattern={"q_proj": 3})),
    "llama-dora": ("llama", None, dict(task_type="CAUSAL_LM", r=4, use_dora=True, target_modules=["o_proj"])),
}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("case", list(ROUND_TRIP))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_save_load_is_bit_identical(case, dtype, tiny_dir, tmp_path):
    family, labels, kw = ROUND_TRIP[case]
    src = make_peft_adapter(tiny_dir(family), tmp_path / "src", num_labels=labels, **kw)
    if dtype is not None:  # half-precision adapters must stay half precision
        f = src / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f), {"format": "pt"})
    first = load_adapter(src)
    save_adapter(first, tmp_path / "copy")
    second = load_adapter(tmp_path / "copy")

    original = load_file(str(src / "adapter_model.safetensors"))
    copied = load_file(str(tmp_path / "copy" / "adapter_model.safetensors"))
    assert set(original) == set(copied)
    for key in original:
        assert original[key].dtype == copied[key].dtype
        assert original[key].shape == copied[key].shape
        assert _bits(original[key]) == _bits(copied[key]), key
    assert json.loads((src / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "copy" / "adapter_config.json").read_text())
    assert first.content_hash() == second.content_hash()
    assert first.config == second.config


def test_round_tripped_adapter_loads_in_peft_to_identical_outputs(tiny_dir, tmp_path):
    from peft import PeftModel

    base = tiny_dir("llama")
    src = make_peft_adapter(base, tmp_path / "src", task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    save_adapter(load_adapter(src), tmp_path / "copy")
    x = torch.randint(6, 100, (2, 7))
    a = PeftModel.from_pretrained(load_task_model(base, "CAUSAL_LM"), str(src)).eval()
    b = PeftModel.from_pretrained(load_task_model(base, "CAUSAL_LM"), str(tmp_path / "copy")).eval()
    assert torch.equal(model_output(a, x), model_output(b, x))


def test_config_fields_and_per_module_scale(tiny_dir, tmp_path):
    src = make_peft_adapter(tiny_dir("bert"), tmp_path / "a", task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16,
                            target_modules=["query", "value"], rank_pattern={"layer.1.attention.self.query": 2},
                            alpha_pattern={"value": 4}, use_rslora=True)
    adapter = load_adapter(src)
    q0, q1 = "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"
    v0 = "encoder.layer.0.attention.self.value"
    assert adapter.modules[q0].rank == 8 and adapter.modules[q1].rank == 2
    assert adapter.modules[q0].scale == pytest.approx(16 / math.sqrt(8))
    assert adapter.modules[q1].scale == pytest.approx(16 / math.sqrt(2))
    assert adapter.modules[v0].scale == pytest.approx(4 / math.sqrt(8))
    assert adapter.config.targets(q0) and not adapter.config.targets("encoder.layer.0.attention.self.key")


def test_content_hash_is_stable_and_sensitive(tiny_dir, tmp_path):
    src = make_peft_adapter(tiny_dir("bert"), tmp_path / "a", task_type="FEATURE_EXTRACTION", r=4,
                            target_modules=["query"])
    h1, h2 = load_adapter(src).content_hash(), load_adapter(src).content_hash()
    assert h1 == h2 and len(h1) == 64
    f = src / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = torch.nextafter(tensors[key].view(-1)[0], torch.tensor(1e9))  # one ulp
    save_file(tensors, str(f))
    assert load_adapter(src).content_hash() != h1


def test_pickled_adapter_needs_opt_in_and_loads_weights_only(tiny_dir, tmp_path):
    src = make_peft_adapter(tiny_dir("bert"), tmp_path / "a", task_type="FEATURE_EXTRACTION", r=4,
                            target_modules=["query"])
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(tensors, src / "adapter_model.bin")
    with pytest.raises(EdgeloraError, match="allow-pickle"):
        load_adapter(src)
    adapter = load_adapter(src, allow_pickle=True)
    assert all(torch.equal(adapter.tensors[k], tensors[k]) for k in tensors)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, src / "adapter_model.bin")
    with pytest.raises(EdgeloraError, match="cannot be loaded safely"):
        load_adapter(src, allow_pickle=True)


@pytest.mark.parametrize("raw, match", [
    ({"lora_alpha": 8}, "has no 'r'"),
    ({"r": 0}, "integer ≥ 1"),
    ({"r": 2.5}, "integer ≥ 1"),
    ({"r": 4, "peft_type": "IA3"}, "LoRA adapters only"),
    ({"r": 4, "lora_alpha": "big"}, "finite number"),
    ({"r": 4, "rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"r": 4, "layer_replication": [[0, 2]]}, "layer_replication"),
    ({"r": 4, "init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"r": 4, "use_dora": "yes"}, "true or false"),
    ([1, 2], "JSON object"),
])
def test_config_validation_names_the_field(raw, match):
    with pytest.raises(EdgeloraError, match=match):
        AdapterConfig.from_dict(raw)
