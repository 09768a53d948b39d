"""The name functions agree with PEFT's own on the same inputs."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from edgelora import names

MODULES = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.11.attention.self.value",
    "bert.encoder.layer.1.attention.output.dense",
    "bert.pooler.dense",
    "classifier",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.10.mlp.experts.0.down_proj",
    "transformer.h.0.attn.c_attn",
    "transformer.h.1.mlp.c_proj",
    "lm_head",
    "score",
]

CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["down_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=r".*\.(query|key|value|dense)"),
    dict(target_modules=["dense", "c_proj"], exclude_modules=["pooler.dense"]),
    dict(target_modules=["q_proj", "lm_head", "score"], modules_to_save=["score"]),
    dict(target_modules=["c_attn", "c_proj"], exclude_modules=r".*mlp.*"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_target_agrees_with_peft(kwargs):
    config = LoraConfig(r=4, **kwargs)
    for module in MODULES:
        theirs = check_target_module_exists(config, module)
        theirs = bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
        ours = names.matches_target(
            module,
            config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules),
            exclude_modules=config.exclude_modules if isinstance(config.exclude_modules, (str, type(None)))
            else sorted(config.exclude_modules),
            modules_to_save=config.modules_to_save,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
        assert ours == theirs, (module, kwargs)


@pytest.mark.parametrize("patterns", [
    ["layer.1.attention.self.query", "value"],
    ["query"],
    [r"layers\.[01]\.self_attn\.q_proj", "mlp.down_proj"],
    ["h.0.attn.c_attn"],
])
def test_pattern_key_agrees_with_peft(patterns):
    for module in MODULES:
        theirs = get_pattern_key(patterns, module)
        ours = names.pattern_key(patterns, module)
        assert (ours if ours is not None else module) == theirs


@pytest.mark.parametrize("key, module, part, param", [
    ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
     "bert.encoder.layer.0.attention.self.query", "lora_A", "weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
     "model.layers.0.self_attn.q_proj", "lora_B", "weight"),
    ("base_model.model.transformer.wte.lora_embedding_A", "transformer.wte", "lora_embedding_A", "weight"),
    ("base_model.model.transformer.h.0.attn.c_proj.lora_magnitude_vector",
     "transformer.h.0.attn.c_proj", "lora_magnitude_vector", "weight"),
    ("base_model.model.x.lora_magnitude_vector.default.weight", "x", "lora_magnitude_vector", "weight"),
    ("base_model.model.transformer.h.0.mlp.c_fc.lora_B.bias", "transformer.h.0.mlp.c_fc", "lora_B", "bias"),
    ("encoder.layer.0.attention.self.query.lora_A.weight", "encoder.layer.0.attention.self.query", "lora_A", "weight"),
])
def test_parse_lora_key(key, module, part, param):
    parsed = names.parse_lora_key(key)
    assert parsed == names.LoraKey(module, part, param)


@pytest.mark.parametrize("key, param", [
    ("base_model.model.classifier.weight", "classifier.weight"),
    ("base_model.model.classifier.modules_to_save.default.bias", "classifier.bias"),
    ("base_model.model.encoder.layer.0.attention.self.query.base_layer.bias",
     "encoder.layer.0.attention.self.query.bias"),
    ("base_model.model.score.weight", "score.weight"),
])
def test_non_lora_keys_name_the_parameter_they_replace(key, param):
    assert names.parse_lora_key(key) is None
    assert names.replacement_param_name(key) == param
