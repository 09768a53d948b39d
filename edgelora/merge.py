"""Merge math: fold ``ΔW = s·B·A`` into ``W0`` (LoRA, Hu et al. 2021, §4.1), in fp32.

``delta`` is pure. The functions that write it into weights never touch their input
(``merge_state_dict``) or remember the pristine weights so unmerging restores them bit for bit
(``merge_into_model`` / ``unmerge``). Merging the same adapter twice is a no-op; merging a second
adapter over a merged one is an error: a weight never gets ΔW added twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import EdgeloraError, EdgeloraWarning
from .validate import MergePlan, MergeTarget


def delta(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False,
          layout: str = "in_out") -> torch.Tensor:
    """``ΔW = scale · B @ A`` in fp32: A (r, in), B (out, r) -> (out, in), or (in, out) if fan_in_fan_out.

    Computed by the on-device runtime's own functions (numpy), in ``layout`` ("in_out" or "out_in"): the
    layout the deployment's swap graph feeds the weight in, so the weights baked into an engine and the
    weights the runtime rebuilds on a swap are the same bits (the layouts' products differ in the last bit)."""
    from .lora import LAYOUTS

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    a = A.detach().to("cpu", torch.float32).numpy()
    b = B.detach().to("cpu", torch.float32).numpy()
    dw = torch.from_numpy(LAYOUTS[layout](a, b, float(scale)))
    if (layout == "in_out") != fan_in_fan_out:
        dw = dw.T
    if not bool(torch.isfinite(dw).all()):
        raise EdgeloraError("ΔW = s·B·A overflows to Inf/NaN in fp32; the adapter is broken, retrain it")
    return dw


def dora_weight(
    W0: torch.Tensor, dW: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """DoRA (Liu et al. 2024): ``m · (W0 + ΔW) / ‖W0 + ΔW‖`` with the norm taken per output channel."""
    W = W0.to(torch.float32) + dW  # stored layout
    W_oi = W.T if fan_in_fan_out else W  # (out, in)
    norm = torch.linalg.norm(W_oi, dim=1)  # (out,)
    factor = magnitude.to(torch.float32) / norm  # (out,)
    return W * (factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1))


def merged_weight(W0: torch.Tensor, target: MergeTarget, layout: str = "in_out") -> torch.Tensor:
    """The new value of ``target``'s weight, computed in fp32 and cast back to ``W0``'s dtype."""
    lora = target.lora
    dW = delta(lora.A, lora.B, lora.scale, target.fan_in_fan_out, layout)
    if lora.magnitude is not None:
        W = dora_weight(W0, dW, lora.magnitude, target.fan_in_fan_out)
    else:
        W = W0.to(torch.float32) + dW
    if not bool(torch.isfinite(W).all()):
        raise EdgeloraError(f"merging {target.module!r} gives Inf/NaN; the adapter is broken, retrain it")
    return W.to(W0.dtype)


def merged_bias(b0: torch.Tensor, target: MergeTarget) -> torch.Tensor:
    assert target.lora.bias is not None  # guarded by MergeTarget.bias_key
    return (b0.to(torch.float32) + target.lora.bias.to(torch.float32) * target.lora.scale).to(b0.dtype)


def _new_values(get: Mapping[str, torch.Tensor], plan: MergePlan, layouts: Mapping[str, str] | None = None
                ) -> dict[str, torch.Tensor]:
    """key -> merged value for every key the plan writes (read-only over ``get``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in plan.replacements.items():
        out[key] = value.detach().to(get[key].dtype).clone()
    for t in plan.targets:
        layout = (layouts or {}).get(t.module, "in_out")
        out[t.weight_key] = merged_weight(get[t.weight_key].detach(), t, layout)
        if t.bias_key is not None:
            out[t.bias_key] = merged_bias(get[t.bias_key].detach(), t)
    return out


def merge_state_dict(state_dict: Mapping[str, torch.Tensor], plan: MergePlan) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter folded in; ``state_dict`` is not modified.

    Keys are those of the task model's ``state_dict()``. Only the keys the plan names change: a
    weight tied to another key (GPT-2's ``wte`` and ``lm_head``) gets its own merged value and the
    partner keeps ``W0``, which is what the unmerged LoRA forward pass computes.
    """
    out = dict(state_dict)
    out.update(_new_values(state_dict, plan))
    return out


@dataclass
class MergeState:
    """Kept on a model while an adapter is merged into it: the pristine tensors it overwrote."""

    adapter_hash: str
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> copy of W0
    untied: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # key -> the shared Parameter
    tie_word_embeddings: bool | None = None


_STATE_ATTR = "_edgelora_merge_state"


def merged_adapter(model: torch.nn.Module) -> str | None:
    """The hash of the adapter merged into ``model``, or None."""
    state = getattr(model, _STATE_ATTR, None)
    return state.adapter_hash if state is not None else None


def _tied_partners(params: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """key -> other keys sharing its storage (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in params.items():
        if v.numel():
            by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k: [o for o in keys if o != k] for keys in by_ptr.values() for k in keys}


@torch.no_grad()
def merge_into_model(model: torch.nn.Module, plan: MergePlan, layouts: Mapping[str, str] | None = None) -> None:
    """Fold the adapter into ``model``'s weights in place (fp32 math), remembering the originals.
    ``layouts``: module -> how its ΔW's product is computed (see :func:`delta`; others "in_out"); the
    exporter passes the layout its swap graph feeds each weight in.

    Merging the adapter that is already merged does nothing; merging another is an error. A merged
    weight that is tied to another module (LoRA on GPT-2's ``wte``, tied to ``lm_head``) is untied:
    the LoRA forward pass adapts only the embedding lookup, so the head keeps ``W0``.
    """
    current = merged_adapter(model)
    if current == plan.adapter_hash:
        return
    if current is not None:
        raise EdgeloraError(
            f"the model already has adapter {current[:12]}… merged; call unmerge() first "
            "(weights are never merged on top of merged weights)"
        )
    params = model.state_dict(keep_vars=True)
    tied = _tied_partners(params)
    new = _new_values(params, plan, layouts)
    state = MergeState(plan.adapter_hash)
    for key, value in new.items():
        param = params[key]
        if tied.get(key):
            module_name, attr = key.rsplit(".", 1)
            state.untied[key] = param
            setattr(model.get_submodule(module_name), attr,
                    torch.nn.Parameter(value, requires_grad=param.requires_grad))
            warnings.warn(
                f"{key!r} is tied to {', '.join(map(repr, tied[key]))}; the adapter changes only {key!r} "
                "(as PEFT's unmerged forward does), so the merged model stores them untied",
                EdgeloraWarning,
                stacklevel=2,
            )
        else:
            state.originals[key] = param.detach().clone()
            param.data.copy_(value)
    config = getattr(model, "config", None)
    if state.untied and config is not None and getattr(config, "tie_word_embeddings", None) is not None:
        state.tie_word_embeddings = config.tie_word_embeddings
        config.tie_word_embeddings = False
    setattr(model, _STATE_ATTR, state)


@torch.no_grad()
def unmerge(model: torch.nn.Module) -> None:
    """Restore the pristine weights (copied back, never computed by subtraction)."""
    state: MergeState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise EdgeloraError("the model has no merged adapter to unmerge")
    params = model.state_dict(keep_vars=True)
    for key, value in state.originals.items():
        params[key].data.copy_(value)
    for key, shared in state.untied.items():
        module_name, attr = key.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, shared)
    if state.tie_word_embeddings is not None:
        model.config.tie_word_embeddings = state.tie_word_embeddings
    delattr(model, _STATE_ATTR)
