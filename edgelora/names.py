"""Weight and module names: the one place that knows the PEFT formats.

PEFT saves an adapter's tensors under keys such as::

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight
    base_model.model.transformer.wte.lora_embedding_A
    base_model.model.transformer.h.0.attn.c_proj.lora_magnitude_vector      (DoRA)
    base_model.model.transformer.h.0.mlp.c_fc.lora_B.bias                   (lora_bias=True)
    base_model.model.classifier.weight                                      (modules_to_save)

Older PEFT releases, and hand-made files, may keep the adapter name in the key
(``lora_A.default.weight``, ``classifier.modules_to_save.default.weight``). Everything here is
matched by splitting on dots and looking for whole tokens, never by substring.

Module matching (``target_modules``, ``rank_pattern``, ``alpha_pattern``) follows PEFT's rules
exactly; tests compare these functions with PEFT's own on the same names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

PEFT_PREFIX = "base_model.model."

LoraPart = Literal["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"]
LORA_PARTS: frozenset[str] = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)
_PARAM_NAMES = frozenset({"weight", "bias"})


@dataclass(frozen=True)
class LoraKey:
    """A parsed LoRA tensor key: which module, which part, which parameter of that part."""

    module: str  # module path in the task model, e.g. "bert.encoder.layer.0.attention.self.query"
    part: LoraPart
    param: Literal["weight", "bias"]


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def parse_lora_key(key: str) -> LoraKey | None:
    """Return the parsed key if ``key`` holds a LoRA tensor, else ``None`` (a plain parameter)."""
    tokens = strip_peft_prefix(key).split(".")
    # The last LoRA token wins: a module may itself be named e.g. "lora_A" only in pathological models.
    idx = max((i for i, t in enumerate(tokens) if t in LORA_PARTS), default=-1)
    if idx <= 0:
        return None
    rest = tokens[idx + 1 :]
    # Allowed tails: [], [param], [adapter], [adapter, param].
    if len(rest) > 2:
        return None
    param = "weight"
    if rest and rest[-1] in _PARAM_NAMES:
        param = rest[-1]
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    return LoraKey(module=".".join(tokens[:idx]), part=tokens[idx], param=param)  # type: ignore[arg-type]


def replacement_param_name(key: str) -> str:
    """Map a non-LoRA adapter key to the task-model parameter it replaces.

    ``base_model.model.classifier.weight`` -> ``classifier.weight``;
    ``base_model.model.classifier.modules_to_save.default.weight`` -> ``classifier.weight``;
    ``base_model.model.x.query.base_layer.bias`` (bias="all" on a LoRA layer) -> ``x.query.bias``.
    """
    tokens = [t for t in strip_peft_prefix(key).split(".") if t != "base_layer"]
    if "modules_to_save" in tokens:
        i = tokens.index("modules_to_save")
        # drop "modules_to_save" and the adapter name after it
        tokens = tokens[:i] + tokens[i + 2 :]
    return ".".join(tokens)


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The key of ``rank_pattern``/``alpha_pattern`` that applies to ``module`` (PEFT's rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    key = pattern_key(pattern.keys(), module)
    return default if key is None else pattern[key]


# complexity: PEFT's own rule (check_target_module_exists), branch for branch, so tests can hold them equal
def matches_target(  # noqa: C901
    module: str,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Whether PEFT would put a LoRA layer on ``module`` for this config."""
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, module):
                return False
        elif module in exclude_modules or any(module.endswith(f".{k}") for k in exclude_modules):
            return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    if module in target_modules:
        return True
    if not any(module.endswith(f".{t}") for t in target_modules):
        return False
    if layers_to_transform is None or (isinstance(layers_to_transform, list) and not layers_to_transform):
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def short_name(module: str) -> str:
    """The last path component: ``...attention.self.query`` -> ``query`` (for display)."""
    return module.rsplit(".", 1)[-1]
