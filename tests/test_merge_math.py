"""The merge math: pure delta, fp32, idempotent merge, exact unmerge, state dicts untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import load_task_model, make_peft_adapter

from edgelora.adapter import load_adapter
from edgelora.errors import EdgeloraError
from edgelora.merge import delta, merge_into_model, merge_state_dict, merged_adapter, unmerge
from edgelora.validate import plan_merge


def test_delta_is_scaled_product_and_transposes_for_fan_in_fan_out():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    expected = torch.einsum("or,ri->oi", B.double(), A.double()) * 0.5  # independent float64 reference
    assert torch.allclose(delta(A, B, 0.5).double(), expected, atol=1e-6)
    assert torch.equal(delta(A, B, 0.5, fan_in_fan_out=True), delta(A, B, 0.5).T)
    # half-precision inputs are multiplied in fp32, not in half
    d16 = delta(A.half(), B.half(), 0.5)
    assert d16.dtype == torch.float32
    assert torch.equal(d16, delta(A.half().float(), B.half().float(), 0.5))
    assert torch.equal(A, torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))  # inputs untouched


def test_delta_refuses_overflow():
    with pytest.raises(EdgeloraError, match="Inf/NaN"):
        delta(torch.full((1, 2), 1e30), torch.full((2, 1), 1e30), 1.0)


@pytest.fixture
def llama_setup(tiny_dir, tmp_path):
    base = tiny_dir("llama")
    a1 = load_adapter(make_peft_adapter(base, tmp_path / "a1", seed=1, task_type="CAUSAL_LM", r=4,
                                        target_modules=["q_proj", "v_proj"]))
    a2 = load_adapter(make_peft_adapter(base, tmp_path / "a2", seed=2, task_type="CAUSAL_LM", r=4,
                                        target_modules=["q_proj", "v_proj"]))
    return base, a1, a2


def test_merge_twice_is_a_no_op_and_another_adapter_is_refused(llama_setup):
    base, a1, a2 = llama_setup
    model = load_task_model(base, "CAUSAL_LM")
    plan = plan_merge(a1, model)
    merge_into_model(model, plan)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    merge_into_model(model, plan)  # same adapter again: nothing changes
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    assert merged_adapter(model) == a1.content_hash()
    with pytest.raises(EdgeloraError, match="unmerge"):
        merge_into_model(model, plan_merge(a2, model))


def test_unmerge_restores_the_base_bit_for_bit_and_allows_a_swap(llama_setup):
    base, a1, a2 = llama_setup
    model = load_task_model(base, "CAUSAL_LM")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    merge_into_model(model, plan_merge(a1, model))
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           pristine["model.layers.0.self_attn.q_proj.weight"])
    unmerge(model)
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())
    merge_into_model(model, plan_merge(a2, model))  # swap to another task
    fresh = load_task_model(base, "CAUSAL_LM")
    merge_into_model(fresh, plan_merge(a2, fresh))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(EdgeloraError, match="no merged adapter"):
        unmerge(load_task_model(base, "CAUSAL_LM"))


def test_merge_state_dict_is_pure_and_equals_model_merge(llama_setup):
    base, a1, _ = llama_setup
    model = load_task_model(base, "CAUSAL_LM")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    plan = plan_merge(a1, model)
    merged = merge_state_dict(sd, plan)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # input untouched
    merge_into_model(model, plan)
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    changed = {k for k in sd if not torch.equal(sd[k], merged[k])}
    assert changed == {t.weight_key for t in plan.targets}
