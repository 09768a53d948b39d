"""Classify sentences with a baked task engine from a deployment folder: onnxruntime + tokenizers only.

    python examples/classify_engine.py out/cpu-fp32 sst2 "a gorgeous, witty movie" "a dull mess"

(No torch, no transformers: what a device runs. `edgelora.runtime` will wrap this with task swaps.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main(folder: str, task: str, sentences: list[str]) -> None:
    root = Path(folder)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["tasks"][task]
    tokenizer = Tokenizer.from_file(str(root / manifest["tokenizer"] / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(128)
    enc = tokenizer.encode_batch(sentences)
    feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
    logits = ort.InferenceSession(str(root / entry["engine"]), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = entry["labels"] or [str(i) for i in range(probs.shape[1])]
    for sentence, p in zip(sentences, probs, strict=False):
        print(f"{labels[int(p.argmax())]:>10s}  {float(p.max()):.3f}  {sentence}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit("usage: python examples/classify_engine.py DEPLOYMENT_FOLDER TASK SENTENCE [SENTENCE ...]")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
