"""Feeds for ``base/lora.onnx``: the base with LoRA branches whose A, B and a row mask are inputs.

Every branch computes ``y += ((x @ A) * mask) @ B`` with ``A`` (in, R), ``B`` (R, out) and
``mask`` (rows, 1, R), one rank axis ``R`` shared by all branches. One task uses its own rank
(modules with a smaller rank, or none, are zero-padded) and a mask of ones (1, 1, r). Several tasks
in one batch stack their blocks along R; row ``i``'s mask is one on its task's block only, so each
row sees exactly its own task's update: a mixed-task batch in one run. No task at all is the base model.

numpy only: the on-device runtime and the exporter's checks both use this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MASK_INPUT = "lora.mask"


def lora_input_names(module: str) -> tuple[str, str]:
    return f"lora.{module}.A", f"lora.{module}.B"


def task_rank(modules: Mapping[str, Any]) -> int:
    return max((int(d.A.shape[0]) for d in modules.values()), default=0)


def stacked_feeds(tasks: Sequence[Mapping[str, Any]], dims: Mapping[str, tuple[int, int]],
                  rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Feeds for ``tasks`` (each ``{module: delta with A (r, in), B (out, r), scale}``) stacked on R.

    ``dims``: ``{module: (in, out)}`` for every branch of the graph. ``rows``: for a mixed batch, the
    index into ``tasks`` of each row; ``None`` gives a (1, 1, R) mask of ones (every row, every task:
    use it with one task).
    """
    ranks = [task_rank(t) for t in tasks]
    # R = 0 (the base model) travels as one zero column: the graph's Reshape cannot infer -1 on an empty axis.
    total = max(1, sum(ranks))
    feeds: dict[str, np.ndarray] = {}
    for module, (in_dim, out_dim) in dims.items():
        a_name, b_name = lora_input_names(module)
        a = np.zeros((in_dim, total), np.float32)
        b = np.zeros((total, out_dim), np.float32)
        start = 0
        for t, r in zip(tasks, ranks, strict=True):
            d = t.get(module)
            if d is not None:
                k = d.A.shape[0]
                a[:, start:start + k] = np.asarray(d.A, np.float32).T
                b[start:start + k, :] = (np.asarray(d.B, np.float32) * np.float32(d.scale)).T
            start += r
        feeds[a_name], feeds[b_name] = a, b
    feeds[MASK_INPUT] = _mask(ranks, rows, total)
    return feeds


def concat_feeds(task_feeds: Sequence[Mapping[str, np.ndarray]], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The mixed-batch feeds ``stacked_feeds(tasks, dims, rows)`` builds, from each task's own feeds
    (``stacked_feeds([task], dims)``, cached by the runtime): A blocks joined along R (axis 1), B blocks
    along R (axis 0), no transpose or scaling per call."""
    ranks = [f[MASK_INPUT].shape[2] for f in task_feeds]
    feeds: dict[str, np.ndarray] = {}
    for name in task_feeds[0]:
        if name != MASK_INPUT:
            feeds[name] = np.concatenate([f[name] for f in task_feeds], axis=1 if name.endswith(".A") else 0)
    feeds[MASK_INPUT] = _mask(ranks, rows, sum(ranks))
    return feeds


def _mask(ranks: Sequence[int], rows: Sequence[int] | None, total: int) -> np.ndarray:
    """(1, 1, R) ones without ``rows``; else (rows, 1, R), one on row i's task block only."""
    if rows is None:
        return np.ones((1, 1, total), np.float32)
    mask = np.zeros((len(rows), 1, total), np.float32)
    starts = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
    for i, t in enumerate(rows):
        mask[i, 0, starts[t]:starts[t + 1]] = 1.0
    return mask
