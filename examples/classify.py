"""Classify sentences with a merged model folder (written by `edgelora merge`): plain transformers.

    python examples/classify.py out/sst2-merged "a gorgeous, witty movie" "a dull mess"
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging


def main(folder: str, sentences: list[str]) -> None:
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # trust_remote_code: a classifier that reads the mean of the token states (the bundled base's pooling) comes
    # with its class, modeling_edgelora.py, written into the folder by `edgelora merge` (read it there)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.inference_mode():
        probs = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits.softmax(-1)
    for sentence, p in zip(sentences, probs, strict=True):
        label = model.config.id2label[int(p.argmax())]
        print(f"{label:>10s}  {float(p.max()):.3f}  {sentence}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python examples/classify.py MERGED_FOLDER SENTENCE [SENTENCE ...]")
    main(sys.argv[1], sys.argv[2:])
