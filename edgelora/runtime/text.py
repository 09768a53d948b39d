"""Text in, ids out (and back): the deployment's ``tokenizer/tokenizer.json`` through the ``tokenizers``
package (Rust, no transformers), with the padding and truncation the engines expect.

The runtime hands over the files' bytes, already checked against the manifest's sha256; a file the
``tokenizers`` package cannot parse is a one-line :class:`DeploymentError`, not the library's exception.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import DeploymentError, InputError


def clip_text(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """``text`` cut, before it is tokenized, to a prefix whose first ``max_tokens`` tokens are the whole text's.

    Tokenizers (``tokenizers`` and transformers alike) encode the whole text and truncate afterwards: a 4 MB line
    cost 1.5 GB for the 128 ids kept. Texts longer than ``32 · max_tokens`` characters are cut at the start of a
    whitespace run (every tokenizer here splits words there, and normalizes character by character, so the
    prefix's tokens are the whole text's first ones); the cut is kept once ``count`` (the prefix's tokens, no
    special tokens) reaches ``max_tokens``, else the bound grows fourfold (text that is mostly whitespace)."""
    limit = max(1024, 32 * max_tokens)
    while len(text) > limit:
        end = limit
        while end > 0 and not text[end].isspace():  # back to a whitespace run's start: a word is never split
            end -= 1
        while end > 0 and text[end - 1].isspace():
            end -= 1
        prefix = text[:end] if end > limit // 2 else text[:limit]  # one huge word: cut inside it
        if count(prefix) >= max_tokens:
            return prefix
        limit *= 4
    return text


def _cut_off(enc: Any) -> int:
    """The tokens truncation cut off an encoding (its overflowing pieces, less the special tokens each gets)."""
    return sum(sum(1 for special in piece.special_tokens_mask if not special) for piece in enc.overflowing)


class Tokenizer:
    def __init__(self, tokenizer_json: bytes, config_json: bytes | None, max_length: int, where: str) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Rust-side exception types for a bad file
            raise DeploymentError(f"{where}/tokenizer.json: the tokenizers package cannot read it "
                                  f"({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}); "
                                  "re-export the folder") from None
        self._tok.no_padding()  # padding is done here, the same for every tokenizer file
        config: dict = {}
        if config_json is not None:
            try:
                config = json.loads(config_json)
            except (ValueError, RecursionError):
                config = None  # type: ignore[assignment]
            if not isinstance(config, dict):
                raise DeploymentError(f"{where}/tokenizer_config.json is not a JSON object; re-export the folder")
        limit = config.get("model_max_length")
        self.max_length = min(limit, max_length) if isinstance(limit, int) and limit > 0 else max_length
        # long texts are cut to the engine's positions by the tokenizer itself, which keeps the special tokens
        # ([CLS] … [SEP]) as transformers' truncation=True does, rather than cutting [SEP] off
        self._tok.enable_truncation(self.max_length)
        self.pad_id = self._token_id(config.get("pad_token") or config.get("eos_token"))
        self.eos_id = self._token_id(config.get("eos_token"))

    def _token_id(self, token: object) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, texts: str | Sequence[str], special_tokens: bool = True) -> dict[str, np.ndarray]:
        """Right-padded ``input_ids`` / ``attention_mask`` (int64) for one text or a batch, each text cut to
        the engine's ``max_length`` tokens."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise InputError("text is an empty list; pass at least one string")
        bad = next((t for t in batch if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"text holds a {type(bad).__name__}, not a string; pass strings (or input_ids)")
        encs = [self._tok.encode(clip_text(t, self.max_length, self._count), add_special_tokens=special_tokens)
                for t in batch]
        ids = [e.ids for e in encs]
        width = max(1, max(len(i) for i in ids))
        out = np.full((len(ids), width), self.pad_id or 0, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": out, "attention_mask": mask}

    def prompt(self, text: str) -> list[int]:
        """One text's ids to continue, whole: a prompt cut as :meth:`encode` cuts would be continued from the
        wrong place, so a text over ``max_length`` tokens is an InputError naming its length and the limit. The
        length counts the pieces truncation cut off (without the special tokens each piece gets); a text over
        ``64 · max_length`` characters whose start is already too long is not counted further (a tokenizer
        encodes the whole text before truncating it: 1.5 GB for a 4 MB line)."""
        limit = 64 * self.max_length
        whole = len(text) <= limit
        enc = self._tok.encode(text if whole else text[:limit])
        rest = _cut_off(enc)
        if not whole and not rest:  # its start fits (a text of mostly spaces): count it all
            whole, enc = True, self._tok.encode(text)
            rest = _cut_off(enc)
        if rest:
            size = (f"{len(enc.ids) + rest} tokens" if whole
                    else f"over {self.max_length} tokens ({len(text):,} characters)")
            raise InputError(f"the prompt is {size}; this deployment takes at most {self.max_length} (the prompt "
                             "and the new tokens share the base's positions); shorten the prompt")
        return list(enc.ids)

    def _count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens, up to ``max_length`` (truncation is on)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
