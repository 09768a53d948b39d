"""What a TensorRT engine build will do, decided and checked without TensorRT (so without a GPU).

- **Refittable weights**: only the ONNX initializers that hold a LoRA target's W0 (the name map's
  ``initializer``; a packed q/k/v initializer once). They are marked refittable one by one
  (``INetworkDefinition.mark_weights_refittable`` under ``BuilderFlag.REFIT_INDIVIDUAL``) so every other weight
  keeps its fusions and constant folding; ``REFIT_IDENTICAL`` is never used (a swap changes the weights).
- **Precision**: TensorRT ≥ 10 builds strongly typed networks from the types in the ONNX graph, so an fp16
  engine is built from the fp16-cast ONNX model (the ONNX backend's ``fp16`` precision), not by builder flags.
- **Optimization profiles**: from the target's shapes — batch 1..``shapes.batch``, sequence 1..``shapes.sequence``
  (decoders: past length 0..sequence, the mask covering past + new tokens).
- **Weight-stripped plan** (``BuilderFlag.STRIP_PLAN``) when the target asks: the shipped engine carries no
  weights; the runtime refits every weight from the ONNX data at load.

:func:`check_prototypes` holds a built engine's refitter to the plan: every planned weight must be refittable
under its ONNX name with the initializer's element count and type, else a one-line error names the module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgelora.errors import EdgeloraError
from edgelora.format.location import WeightLocation

REFIT_FLAG = "REFIT_INDIVIDUAL"
DTYPES = {"fp16": "HALF", "fp32": "FLOAT"}  # TensorRT DataType names of the planned weights


@dataclass(frozen=True)
class Profile:
    """One input's shape range for TensorRT's optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildPlan:
    onnx: str  # the ONNX model the engine is built from (its types decide the engine's: strongly typed)
    precision: str
    refittable: tuple[str, ...]  # ONNX initializer names, sorted
    modules: Mapping[str, str]  # LoRA target module -> its initializer
    profiles: tuple[Profile, ...]
    flags: tuple[str, ...]  # BuilderFlag names
    weight_dtype: str  # TensorRT DataType name of the refittable weights
    counts: Mapping[str, int]  # element count of each refittable weight

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "precision": self.precision, "refittable": list(self.refittable),
                "modules": dict(self.modules), "flags": list(self.flags), "weight_dtype": self.weight_dtype,
                "counts": dict(self.counts),
                "profiles": [{"name": p.name, "min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                             for p in self.profiles]}


def profiles(spec: Mapping[str, Any], batch: int, sequence: int) -> tuple[Profile, ...]:
    """Shape ranges for every input of an engine with io ``spec`` (the manifest's ``EngineIO`` as JSON)."""
    out = []
    kv = (spec.get("num_kv_heads", 0), spec.get("head_dim", 0))
    for name in spec["inputs"]:
        if name.startswith("past_key_values."):
            out.append(Profile(name, (1, kv[0], 0, kv[1]), (batch, kv[0], sequence // 2, kv[1]),
                               (batch, kv[0], sequence, kv[1])))
        elif name == "attention_mask" and spec["kind"] == "causal-lm":  # covers past + new tokens
            out.append(Profile(name, (1, 1), (batch, sequence), (batch, 2 * sequence)))
        else:
            out.append(Profile(name, (1, 1), (batch, sequence), (batch, sequence)))
    return tuple(out)


def make_plan(onnx: str, spec: Mapping[str, Any], locations: Mapping[str, WeightLocation],
              initializers: Mapping[str, tuple[tuple[int, ...], str]], target: Any, strip: bool = False) -> BuildPlan:
    """The plan for ``onnx`` whose initializers are ``{name: (shape, onnx dtype name)}``; every LoRA target's
    initializer must be there with the name map's shape (one-line error naming the module otherwise)."""
    if target.precision not in DTYPES:
        raise EdgeloraError(f"{target.source}: precision = {target.precision!r}; a TensorRT target builds fp16 or "
                            "fp32 engines (int8 needs a QDQ model; not supported yet)")
    want = "FLOAT16" if target.precision == "fp16" else "FLOAT"
    modules = {}
    for module, loc in sorted(locations.items()):
        found = initializers.get(loc.initializer)
        if found is None:
            raise EdgeloraError(f"LoRA target {module}: its weight {loc.initializer!r} is not an initializer of "
                                f"{onnx}; re-export the base (the ONNX graph and the name map disagree)")
        shape, dtype = found
        if tuple(shape) != tuple(loc.shape) or dtype != want:
            raise EdgeloraError(f"LoRA target {module}: initializer {loc.initializer!r} is {dtype} {tuple(shape)}, "
                                f"the plan needs {want} {tuple(loc.shape)}; re-export the base for {target.name}")
        modules[module] = loc.initializer
    flags = (REFIT_FLAG, *(("STRIP_PLAN",) if strip else ()))
    counts = {loc.initializer: loc.shape[0] * loc.shape[1] for loc in locations.values()}
    return BuildPlan(onnx, target.precision, tuple(sorted(set(modules.values()))), modules,
                     profiles(spec, target.shapes.batch, target.shapes.sequence), flags, DTYPES[target.precision],
                     counts)


def check_prototypes(plan: BuildPlan, prototypes: Mapping[str, tuple[int, str]]) -> None:
    """``prototypes``: what the built engine's refitter reports, ``{weight name: (element count, DataType
    name)}`` (``Refitter.get_all_weights`` and ``get_weights_prototype``). Every planned weight must be there,
    with its initializer's size and the plan's type: a weight TensorRT folded away cannot be swapped."""
    by_weight: dict[str, list[str]] = {}
    for module, init in plan.modules.items():
        by_weight.setdefault(init, []).append(module)
    for name in plan.refittable:
        modules = ", ".join(by_weight.get(name, [])[:3])
        if name not in prototypes:
            raise EdgeloraError(f"TensorRT engine: LoRA target {modules}: weight {name!r} is not refittable in the "
                                "built engine (folded or fused away); rebuild with the plan's refittable weights")
        count, dtype = prototypes[name]
        if dtype != plan.weight_dtype:
            raise EdgeloraError(f"TensorRT engine: LoRA target {modules}: weight {name!r} is {dtype}, the plan "
                                f"refits {plan.weight_dtype}; rebuild the engine")
        if count != plan.counts[name]:
            raise EdgeloraError(f"TensorRT engine: LoRA target {modules}: weight {name!r} holds {count} values, "
                                f"the ONNX initializer {plan.counts[name]}; rebuild the engine")
