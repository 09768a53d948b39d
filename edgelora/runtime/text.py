"""Text in, ids out (and back): the deployment's ``tokenizer/tokenizer.json`` through the ``tokenizers``
package (Rust, no transformers), with the padding and truncation the engines expect."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import EdgeloraError


class Tokenizer:
    def __init__(self, folder: Path, max_length: int = 512) -> None:
        from tokenizers import Tokenizer as _Tok

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise EdgeloraError(f"{path}: no tokenizer.json in the deployment; pass input_ids instead of text")
        self._tok = _Tok.from_file(str(path))
        self._tok.no_padding()  # padding and truncation are done here, the same for every tokenizer file
        self._tok.no_truncation()
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.max_length = min(int(config.get("model_max_length") or max_length), max_length)
        pad = config.get("pad_token") or config.get("eos_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        self.pad_id = self._tok.token_to_id(pad) if isinstance(pad, str) else None
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        self.eos_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None

    def encode(self, texts: str | Sequence[str], special_tokens: bool = True) -> dict[str, np.ndarray]:
        """Right-padded ``input_ids`` / ``attention_mask`` (int64) for one text or a batch."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encs = [self._tok.encode(t, add_special_tokens=special_tokens) for t in batch]
        ids = [e.ids[: self.max_length] for e in encs]
        width = max(1, max(len(i) for i in ids))
        out = np.full((len(ids), width), self.pad_id or 0, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": out, "attention_mask": mask}

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
