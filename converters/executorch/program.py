"""torch -> an XNNPACK-delegated ExecuTorch program (``.pte``) whose shared weights live in a ``.ptd`` data file.

Two forms of one task, both over the same base weights:

- **merged**: the task's model with ``W0 + s·B·A`` folded into its LoRA targets and its head in place. The
  program keeps only what differs from the base inline (the merged target weights, the head); every other
  weight is tagged ``base`` and goes to the shared ``base.ptd``.
- **branches**: one program for every task, the base (W0 everywhere, in ``base.ptd``) with each LoRA target
  as ``W0·x + (x·Aᵀ)·(s·B)ᵀ`` whose ``Aᵀ`` and ``(s·B)ᵀ`` are inputs, and the head's weight and bias inputs too
  (padded to the most labels any task has). A task is then only its A, B and head.

How the weights are split (read from the installed ExecuTorch, ``exir/passes/external_constants_pass.py`` and
``backends/xnnpack/operators/node_visitor.py``): a constant the XNNPACK delegate consumes goes to the named data
file given by ``node.meta["custom"]["delegate_constant_tag"]``, under the sha256 of its bytes; a constant run by
the portable kernels (the embedding tables, LayerNorm) goes to the file ``ExecutorchBackendConfig
.external_constants(node)`` names, under its fully qualified name. Both kinds are tagged here by the weight's
name in the model, so the base weights of every program land in one file under the same keys, and a program
reads only the keys it needs (the merged programs skip the W0 of the LoRA targets the branch program reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

BASE_TAG = "base"  # -> base.ptd


class Logits(torch.nn.Module):
    """A transformers sequence classifier as ``(input_ids, attention_mask) -> logits`` (what torch.export
    traces; the model sits under ``m`` in both forms, so the shared weights keep one name)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


class _Feeds:
    """The branch program's extra inputs while it runs (a plain holder, not a module: nothing in it is a
    weight, so torch.export sees graph inputs, not constants)."""

    tensors: Sequence[torch.Tensor] = ()


class LoraBranch(torch.nn.Module):
    """``W0·x + b + (x·Aᵀ)·(s·B)ᵀ``: A transposed (in, r) and s·B transposed (r, out) are inputs ``2i``, ``2i+1``."""

    def __init__(self, base: torch.nn.Linear, feeds: _Feeds, index: int) -> None:
        super().__init__()
        self.base, self.feeds, self.index = base, feeds, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_t, sb_t = self.feeds.tensors[2 * self.index], self.feeds.tensors[2 * self.index + 1]
        return self.base(x) + (x @ a_t) @ sb_t  # (B, T, in) @ (in, r) @ (r, out)


class FedHead(torch.nn.Module):
    """A Linear head whose transposed weight (in, labels) and bias (labels,) are the program's last inputs."""

    def __init__(self, feeds: _Feeds) -> None:
        super().__init__()
        self.feeds = feeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.feeds.tensors[-2] + self.feeds.tensors[-1]


class Branches(torch.nn.Module):
    """The branch form: ``(input_ids, attention_mask, A0ᵀ, sB0ᵀ, ..., headᵀ, head_bias) -> logits``."""

    def __init__(self, model: torch.nn.Module, modules: Sequence[str], head: str) -> None:
        super().__init__()
        self.feeds = _Feeds()
        for i, name in enumerate(modules):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, child)
            if not isinstance(linear, torch.nn.Linear):
                raise TypeError(f"{name} is a {type(linear).__name__}, not a Linear")
            setattr(owner, child, LoraBranch(linear, self.feeds, i))
        parent, _, child = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FedHead(self.feeds))
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *feeds: torch.Tensor) -> torch.Tensor:
        self.feeds.tensors = feeds
        try:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.feeds.tensors = ()


def lower(module: torch.nn.Module, example: Sequence[torch.Tensor], shared: set[str]) -> Any:
    """torch.export ``module`` at the example's (static) shapes and lower it to XNNPACK; every weight whose
    name (in ``module.state_dict()``) is in ``shared`` is tagged for ``base.ptd``, the rest stay in the program.
    Returns ExecuTorch's program manager (``write`` saves it)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module.eval(), tuple(example), strict=False)
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    tagged = {node for node, fqn in names.items() if fqn in shared}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in tagged:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = BASE_TAG
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])

    def portable_tag(node: torch.fx.Node) -> str | None:  # constants the delegate does not consume
        return BASE_TAG if node.name in tagged else None

    return edge.to_executorch(ExecutorchBackendConfig(external_constants=portable_tag))


def write(program: Any, folder: Path, stem: str, data: bool) -> Path:
    """``folder/stem.pte``; with ``data``, also the program's ``.ptd`` files (``base.ptd``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.pte"
    with open(path, "wb") as f:
        program.write_to_file(f)
    if data:
        program.write_tensor_data_to_file(str(folder))
    return path
