"""Check an adapter against a base model and turn it into a merge plan.

Before anything is merged: every LoRA module exists in the base and is a layer edgelora can fold
(``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``); A and B fit the base weight; every
``modules_to_save`` / bias tensor replaces a base parameter of the same shape; the adapter's
recorded base fingerprint (when it has one) is this base's.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, LoraModule
from .base import HeadSpec
from .errors import EdgeloraError, EdgeloraWarning


@dataclass(frozen=True)
class MergeTarget:
    """One weight to rewrite as ``W0 + ΔW`` (or DoRA's rescaled form)."""

    module: str
    weight_key: str  # key in model.state_dict()
    bias_key: str | None  # set when the LoRA has a bias (lora_bias=True)
    fan_in_fan_out: bool  # True when W is stored (in, out): GPT-2 Conv1D, and embeddings (see delta)
    lora: LoraModule


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge needs, checked against one base model."""

    targets: tuple[MergeTarget, ...]
    replacements: Mapping[str, torch.Tensor]  # state_dict key -> new value (modules_to_save, trained biases)
    adapter_hash: str


def _layer_kind(module: torch.nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


def check_fingerprint(adapter: Adapter, base_fingerprint: str, base_name: str) -> None:
    """Refuse an adapter whose recorded base is not this base (adapters trained by edgelora)."""
    rec = adapter.record
    if rec is not None and rec.base_fingerprint and rec.base_fingerprint != base_fingerprint:
        raise EdgeloraError(
            f"adapter {adapter.source} was trained on base {rec.base or '?'} (fingerprint "
            f"{rec.base_fingerprint[:12]}…) but --base {base_name} has fingerprint {base_fingerprint[:12]}…; "
            "pass the base it was trained on"
        )


def check_coverage(adapter: Adapter, model: torch.nn.Module) -> None:
    """The adapter's tensors and its ``target_modules`` name the same modules, as PEFT loads them: tensors of a
    module the config does not target are dropped by PEFT ("unexpected adapter keys"), and a targeted layer
    without tensors gets a fresh LoRA layer ("missing adapter keys"; random B unless initialised to zero).
    Either way PEFT's model is not the one a merge of the tensors would make, so both are refused."""
    cfg, where = adapter.config, adapter.source or "adapter"
    if cfg.target_modules is None or (isinstance(cfg.target_modules, str)
                                      and cfg.target_modules.lower() == "all-linear"):
        return  # PEFT resolves these from the model at injection (and saves the resolved names)
    shown = (repr(cfg.target_modules) if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules))
    for name in adapter.modules:
        if not cfg.targets(name):
            raise EdgeloraError(f"{where}: LoRA module {name!r} has tensors but target_modules ({shown:.120}) does "
                                "not name it, so PEFT would drop them; add it to target_modules in "
                                "adapter_config.json or re-save the adapter with PEFT")
    for name, layer in model.named_modules():
        if name and name not in adapter.modules and _layer_kind(layer) is not None and cfg.targets(name):
            raise EdgeloraError(f"{where}: target_modules ({shown:.120}) names module {name!r} but the adapter has "
                                "no LoRA tensors for it, so PEFT would give it a fresh LoRA layer; remove it from "
                                "target_modules in adapter_config.json or re-save the adapter with PEFT")


# complexity: one check per way a module can fail to fit the base (missing, layer kind, shapes, DoRA, bias),
# each with its own message naming the module
def plan_merge(adapter: Adapter, model: torch.nn.Module) -> MergePlan:  # noqa: C901
    """Validate ``adapter`` against ``model`` (a transformers task model) and return the plan."""
    where = adapter.source or "adapter"
    state = model.state_dict(keep_vars=True)
    targets: list[MergeTarget] = []
    for name, lora in adapter.modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise EdgeloraError(
                f"{where}: LoRA module {name!r} is not in the base model ({type(model).__name__}); "
                "the adapter was made for another base or task, pass the matching --base"
            ) from None
        kind = _layer_kind(layer)
        if kind is None:
            raise EdgeloraError(
                f"{where}: LoRA module {name!r} is a {type(layer).__name__}; edgelora merges LoRA on "
                "Linear, Conv1D and Embedding layers only"
            )
        W = layer.weight
        if kind == "embedding":
            if lora.kind != "embedding":
                raise EdgeloraError(f"{where}: module {name!r} is an Embedding but has lora_A/lora_B (Linear LoRA)")
            if lora.magnitude is not None:
                raise EdgeloraError(f"{where}: DoRA on Embedding {name!r} is not supported; retrain without use_dora")
            fan_in_fan_out = True  # PEFT: ΔW = (B·A)ᵀ for (num_embeddings, dim) weights
            n_in, n_out = W.shape
        else:
            if lora.kind != "linear":
                raise EdgeloraError(f"{where}: module {name!r} is a {type(layer).__name__} but has embedding LoRA")
            fan_in_fan_out = kind == "conv1d"
            n_out, n_in = (W.shape[1], W.shape[0]) if fan_in_fan_out else (W.shape[0], W.shape[1])
            if fan_in_fan_out != adapter.config.fan_in_fan_out:
                warnings.warn(
                    f"{where}: fan_in_fan_out={adapter.config.fan_in_fan_out} in adapter_config.json, but "
                    f"{name!r} is a {type(layer).__name__} that stores its weight "
                    f"{'(in, out)' if fan_in_fan_out else '(out, in)'}; merging as fan_in_fan_out={fan_in_fan_out}",
                    EdgeloraWarning,
                    stacklevel=2,
                )
        r = lora.rank
        if tuple(lora.A.shape) != (r, n_in) or tuple(lora.B.shape) != (n_out, r):
            raise EdgeloraError(
                f"{where}: module {name!r}: A {tuple(lora.A.shape)} and B {tuple(lora.B.shape)} do not fit the "
                f"base weight {tuple(W.shape)} (expected A ({r}, {n_in}) and B ({n_out}, {r})); "
                "the adapter was made for another base"
            )
        bias_key = None
        if lora.bias is not None:
            if getattr(layer, "bias", None) is None:
                raise EdgeloraError(f"{where}: module {name!r} has lora_B.bias but the base layer has no bias")
            if tuple(lora.bias.shape) != tuple(layer.bias.shape):
                raise EdgeloraError(
                    f"{where}: module {name!r} lora_B.bias has shape {tuple(lora.bias.shape)}, "
                    f"base bias has {tuple(layer.bias.shape)}"
                )
            bias_key = f"{name}.bias"
        targets.append(MergeTarget(name, f"{name}.weight", bias_key, fan_in_fan_out, lora))
    check_coverage(adapter, model)  # after each module is found in the base: a wrong base is named as such

    replacements: dict[str, torch.Tensor] = {}
    for key, value in adapter.replacements.items():
        if key not in state:
            raise EdgeloraError(
                f"{where}: tensor {key!r} (modules_to_save) names no parameter of the base model; "
                "the adapter was made for another base or task"
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise EdgeloraError(
                f"{where}: tensor {key!r} has shape {tuple(value.shape)} but the base parameter has "
                f"{tuple(state[key].shape)}; the adapter was made for another base or head size"
            )
        replacements[key] = value
    return MergePlan(tuple(targets), replacements, adapter.content_hash())


def infer_head(adapter: Adapter, folder: Path, task: str) -> HeadSpec:
    """Number of labels (and names) of a classification adapter's head.

    edgelora-trained adapters record their labels. For others, build the task model on the meta
    device and read the label count off the ``modules_to_save`` tensors whose leading dimension is
    the only one that differs from the base's default head.
    """
    if task not in ("sequence-classification", "token-classification"):
        return HeadSpec()
    pooling = (adapter.record.pooling if adapter.record is not None else None) or "cls"
    if adapter.record is not None and adapter.record.labels:
        return HeadSpec(len(adapter.record.labels), tuple(adapter.record.labels), pooling)
    import transformers

    from .base import TASKS, quiet_transformers

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = getattr(transformers, TASKS[task][1]).from_config(config)
    default = config.num_labels
    shapes: Mapping[str, Any] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sizes = {
        int(v.shape[0])
        for k, v in adapter.replacements.items()
        if k in shapes
        and tuple(v.shape) != shapes[k]
        and v.dim() >= 1
        and shapes[k][0] == default
        and tuple(v.shape[1:]) == shapes[k][1:]
    }
    if len(sizes) == 1:
        return HeadSpec(sizes.pop(), pooling=pooling)
    return HeadSpec(default, pooling=pooling)
