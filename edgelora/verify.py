"""Check an engine against PyTorch: the same fixed inputs through both, and the numbers that matter.

- encoders / classifiers: a fixed batch (seeded token ids, one row padded) -> max |Δ|, cosine over
  the whole output, argmax agreement per row (per token for hidden states: the nearest is argmax of
  the pooled vector);
- causal LMs: a prefill of the batch, then one decode step fed the engine's own cache -> max |Δ| and
  cosine of all logits, next-token agreement at every position;
- with a labelled file: accuracy of the engine and of PyTorch on it (classification).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    cosine: float
    agreement: float

    def to_json(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "cosine": self.cosine, "agreement": self.agreement}


def compare(engine: np.ndarray, ref: np.ndarray) -> Parity:
    e = engine.astype(np.float64).ravel()
    r = ref.astype(np.float64).ravel()
    denom = float(np.linalg.norm(e) * np.linalg.norm(r))
    cosine = float(e @ r / denom) if denom > 0 else (1.0 if np.array_equal(e, r) else 0.0)
    agree = float(np.mean(engine.argmax(-1) == ref.argmax(-1)))
    return Parity(float(np.max(np.abs(e - r))) if e.size else 0.0, cosine, agree)


def fixed_inputs(vocab_size: int, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded ids avoiding the lowest ids (special tokens); the last row is half padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab_size // 2), vocab_size, size=(batch, sequence), dtype=np.int64)
    mask = np.ones((batch, sequence), dtype=np.int64)
    if batch > 1:
        mask[-1, sequence // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def session(path: Any, provider: str = "CPUExecutionProvider", threads: int | None = None) -> Any:
    """An ONNX Runtime session with the on-device runtime's own options, so that engines timed side by side
    run alike (and none keeps spinning into the next one's turn)."""
    import onnxruntime as ort

    from .runtime.sessions import session_options

    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), session_options(threads), providers=providers)


# --------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------


def torch_encoder_outputs(model: Any, inputs: dict[str, np.ndarray], headless: bool) -> dict[str, np.ndarray]:
    with torch.no_grad():
        ids = torch.from_numpy(inputs["input_ids"])
        mask = torch.from_numpy(inputs["attention_mask"])
        if headless:
            out = model.base_model(input_ids=ids, attention_mask=mask)
            res = {"last_hidden_state": out.last_hidden_state.numpy()}
            if getattr(out, "pooler_output", None) is not None:
                res["pooler_output"] = out.pooler_output.numpy()
            return res
        return {"logits": model(input_ids=ids, attention_mask=mask).logits.numpy()}


def check_encoder(sess: Any, model: Any, inputs: dict[str, np.ndarray], headless: bool,
                  extra: dict[str, np.ndarray] | None = None) -> Parity:
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {**inputs, **(extra or {})}), strict=False))
    ref = torch_encoder_outputs(model, inputs, headless)
    key = "logits" if "logits" in ref else ("pooler_output" if "pooler_output" in ref else "last_hidden_state")
    worst = compare(got[key], ref[key])
    for k in ref:  # the max difference over every output, the cosine and agreement of the main one
        if k != key:
            other = compare(got[k], ref[k])
            worst = Parity(max(worst.max_abs_diff, other.max_abs_diff), min(worst.cosine, other.cosine),
                           worst.agreement)
    return worst


def classify_accuracy(sess: Any, model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                      max_length: int = 128, batch_size: int = 64) -> tuple[float, float]:
    """(engine accuracy, torch accuracy) on a labelled set."""
    right_engine = right_torch = 0
    # batches of similar length: little padding, so the whole file runs in seconds
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        inputs = {"input_ids": enc["input_ids"].astype(np.int64),
                  "attention_mask": enc["attention_mask"].astype(np.int64)}
        gold = np.asarray([labels[i] for i in rows])
        right_engine += int((sess.run(["logits"], inputs)[0].argmax(-1) == gold).sum())
        right_torch += int((torch_encoder_outputs(model, inputs, False)["logits"].argmax(-1) == gold).sum())
    return right_engine / len(texts), right_torch / len(texts)


# --------------------------------------------------------------------------------------------------
# decoders
# --------------------------------------------------------------------------------------------------


def empty_cache(spec: Any, batch: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {name: np.zeros((batch, spec["num_kv_heads"], 0, spec["head_dim"]), dtype=dtype)
            for name in spec["inputs"] if name.startswith("past_key_values.")}


def check_causal_lm(sess: Any, model: Any, spec: dict[str, Any], inputs: dict[str, np.ndarray],
                    extra: dict[str, np.ndarray] | None = None) -> Parity:
    """Prefill then one cached decode step, against the full-sequence torch forward pass."""
    ids, mask = inputs["input_ids"], np.ones_like(inputs["input_ids"])  # causal LMs: no padding here
    batch, seq = ids.shape
    prefill_len = seq - 1
    extra = extra or {}
    feeds = {"input_ids": ids[:, :prefill_len], "attention_mask": mask[:, :prefill_len], **empty_cache(spec, batch),
             **extra}
    out = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    present = dict(zip(names, out, strict=False))
    step = {"input_ids": ids[:, prefill_len:], "attention_mask": mask}
    step |= {n.replace("present.", "past_key_values."): v for n, v in present.items() if n.startswith("present.")}
    step |= extra
    last = sess.run(["logits"], step)[0]
    got = np.concatenate([present["logits"], last], axis=1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return compare(got, ref)


def within(p: Parity, tol: Any) -> list[str]:
    """The tolerance lines a parity result misses (empty when it passes)."""
    bad = []
    if not (p.max_abs_diff <= tol.max_abs_diff) or math.isnan(p.max_abs_diff):
        bad.append(f"max |Δ| {p.max_abs_diff:.3g} > {tol.max_abs_diff:g}")
    if not (p.cosine >= tol.min_cosine):
        bad.append(f"cosine {p.cosine:.6f} < {tol.min_cosine:g}")
    if not (p.agreement >= tol.min_agreement):
        bad.append(f"agreement {p.agreement:.3f} < {tol.min_agreement:g}")
    return bad
