"""Task heads on top of a headless base engine, in numpy (they travel in each task's delta file).

- BERT-style classifier: ``logits = pooler_output @ Wᵀ + b`` (``classifier.weight``/``.bias``), or, for a
  task whose delta says ``pooling = "mean"``, the same on the masked mean of ``last_hidden_state``;
- decoder classifier (``score.weight``): the hidden state of each row's last real token;
- no head tensors (feature extraction): the base outputs as they are.
Any other head tensor would change the inside of the base, which a swap cannot do: such a task
runs on its baked engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

HEAD_ROWS = (("classifier.weight", "classifier.bias"), ("score.weight", "score.bias"))  # (weight, bias)
KNOWN = {name for pair in HEAD_ROWS for name in pair}


def unsupported(head: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(set(head) - KNOWN)


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` (batch, seq, dim) over the positions where ``attention_mask`` is 1 (as
    ``edgelora.modeling_edgelora.mean_pool``)."""
    mask = attention_mask.astype(np.float32)[:, :, None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def apply_head(head: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               attention_mask: np.ndarray, pooling: str = "cls") -> dict[str, np.ndarray]:
    if "classifier.weight" in head:
        if pooling == "mean":
            pooled = mean_pool(outputs["last_hidden_state"], attention_mask)
        else:
            pooled = outputs["pooler_output"] if "pooler_output" in outputs else outputs["last_hidden_state"][:, 0]
        logits = pooled @ np.asarray(head["classifier.weight"]).T
        if "classifier.bias" in head:
            logits = logits + head["classifier.bias"]
        return {"logits": logits.astype(np.float32)}
    if "score.weight" in head:
        hidden = outputs["last_hidden_state"]
        last = np.maximum(attention_mask.sum(axis=1) - 1, 0).astype(np.int64)
        logits = hidden[np.arange(hidden.shape[0]), last] @ np.asarray(head["score.weight"]).T
        if "score.bias" in head:
            logits = logits + head["score.bias"]
        return {"logits": logits.astype(np.float32)}
    return dict(outputs)
