"""``conformance.safetensors``: the reference vectors a deployment folder carries, one writer and one reader.

The file holds, per task ``T`` of the manifest's ``conformance.tasks``: ``T/input_ids`` and ``T/attention_mask``
(int64, batch × sequence) and ``T/{output}`` (float32) for each output it lists: what PyTorch computed for those
inputs with the task's adapter merged (all positions, or the last position of a decoder's logits), and
``T/{output}:without_lora``: the same model with the task's head but W0 in place of ``W0 + s·B·A`` — how far the
LoRA moves these outputs in PyTorch, so a device can tell a task that changes nothing from one whose change is
within its target's quantization error. It is written
by ``edgelora export`` and read by ``Runtime.self_test`` on whatever machine holds the folder. Kilobytes: a few
short rows of ids and their outputs.

Only float32 and int64 are written or accepted; the reader is :mod:`.safetensors`' strict one, over bytes already
checked against the manifest's size and sha256.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeploymentError
from .manifest import ConformanceSpec
from .safetensors import parse, write

CONFORMANCE_FILE = "conformance.safetensors"
INPUTS = ("input_ids", "attention_mask")
WITHOUT_LORA = ":without_lora"  # suffix of the no-LoRA outputs (":" is in no output name)


@dataclass(frozen=True)
class Reference:
    """One task's reference vectors: the inputs and PyTorch's outputs for them."""

    inputs: dict[str, np.ndarray]  # input_ids, attention_mask: int64 (batch, sequence)
    outputs: dict[str, np.ndarray]  # output name -> float32
    positions: str  # "all" | "last"
    without: dict[str, np.ndarray]  # the same outputs with the task's head but no LoRA (W0)


def save_tensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    """A safetensors file of float32 / int64 tensors, byte for byte the same for the same input (sorted header,
    sorted data), so two exports of the same adapters write the same file."""
    write(tensors, path, metadata)


def reference_tensors(references: Mapping[str, Reference]) -> dict[str, np.ndarray]:
    """The file's tensors for ``task -> Reference``."""
    out: dict[str, np.ndarray] = {}
    for task, ref in references.items():
        out |= {f"{task}/{k}": v for k, v in ref.inputs.items()}
        out |= {f"{task}/{k}": v for k, v in ref.outputs.items()}
        out |= {f"{task}/{k}{WITHOUT_LORA}": v for k, v in ref.without.items()}
    return out


def parse_references(data: Any, spec: ConformanceSpec, where: str) -> dict[str, Reference]:
    """Each task's reference vectors from the file's bytes, checked against ``spec``: every tensor it names is
    there with the right dtype, the inputs are (batch, sequence) with a 0/1 mask, the outputs have one row per
    input row and are finite. One-line :class:`DeploymentError` naming the tensor otherwise."""
    tensors, _ = parse(data, where)
    refs: dict[str, Reference] = {}
    for task, t in spec.tasks.items():
        def get(key: str, dtype: str, task: str = task) -> np.ndarray:
            a = tensors.get(f"{task}/{key}")
            if a is None:
                raise DeploymentError(f"{where}: tensor {task}/{key} is missing; re-export the folder")
            if a.dtype != np.dtype(dtype):
                raise DeploymentError(f"{where}: tensor {task}/{key} is {a.dtype}, not {np.dtype(dtype)}; re-export "
                                      "the folder")
            return np.array(a)  # a copy: the file's buffer is not kept

        ids, mask = get("input_ids", "<i8"), get("attention_mask", "<i8")
        if ids.ndim != 2 or ids.shape != mask.shape or ids.size == 0 or not np.isin(mask, (0, 1)).all():
            raise DeploymentError(f"{where}: {task}/input_ids {list(ids.shape)} and attention_mask "
                                  f"{list(mask.shape)} must be one non-empty (batch, sequence) shape with a 0/1 mask; "
                                  "re-export the folder")
        outputs, without = {}, {}
        for name in t.outputs:
            a, b = get(name, "<f4"), get(name + WITHOUT_LORA, "<f4")
            if a.ndim < 1 or a.shape[0] != ids.shape[0] or b.shape != a.shape or not (
                    np.isfinite(a).all() and np.isfinite(b).all()):
                raise DeploymentError(f"{where}: tensor {task}/{name} {list(a.shape)} must be finite with "
                                      f"{ids.shape[0]} rows (one per input row), {name}{WITHOUT_LORA} "
                                      f"{list(b.shape)} too; re-export the folder")
            outputs[name], without[name] = a, b
        refs[task] = Reference({"input_ids": ids, "attention_mask": mask}, outputs, t.positions, without)
    return refs
