"""What a call may feed an engine, checked before it gets there.

ONNX Runtime would wrap a negative id to the end of the vocabulary, truncate float ids, and answer wrong
ranks, out-of-range ids, masks of the wrong shape or sequences past the position table with its own errors
(or none). Every input is checked here instead and refused with an :class:`InputError` that names it and the
limit: integer ids in ``0..vocab-1``, ``(batch, sequence)`` (or one ``(sequence,)``), at most the base's
positions (past tokens included), a 0/1 mask of ``(batch, past + sequence)``, a whole KV cache of the right
geometry or none. ``token_type_ids`` — what every BERT tokenizer returns — is passed on when the engine takes
it, and accepted and dropped when all zero and the engine has none (single-segment input).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError
from ..format.manifest import EngineIO

SEGMENTS = "token_type_ids"
PAST = "past_key_values."


def as_ints(value: Any, name: str, bools: bool = False) -> np.ndarray:
    """``value`` as an integer array, or an InputError: floats would be truncated, object arrays are not ids."""
    a = np.asarray(value)
    if a.size == 0:
        raise InputError(f"{name} is empty; pass at least one token")
    if a.dtype.kind not in ("iub" if bools else "iu"):
        raise InputError(f"{name} has dtype {a.dtype}; pass integers (e.g. numpy int64), not floats or objects")
    return a


class FeedChecker:
    """Checks a call's inputs against one engine's io spec and turns them into its feeds."""

    def __init__(self, io: EngineIO, vocab_size: int, max_positions: int | None,
                 past_dtypes: Mapping[str, np.dtype]) -> None:
        self.io = io
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.past_names = [n for n in io.inputs if n.startswith(PAST)]
        self.past_dtypes = {n: past_dtypes.get(n, np.dtype(np.float32)) for n in self.past_names}

    def check(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = sorted(set(inputs) - set(self.io.inputs) - {SEGMENTS})
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(unknown)}; the engine takes {', '.join(self.io.inputs)}")
        if inputs.get("input_ids") is None:
            raise InputError("run needs input_ids (or text=...)")
        ids = self._ids(inputs["input_ids"])
        batch, seq = ids.shape
        past, past_len = self._past(inputs, batch)
        if self.max_positions is not None and past_len + seq > self.max_positions:
            raise InputError(f"{past_len + seq} tokens exceed the base's {self.max_positions} positions; shorten the "
                             "input (text= is truncated to fit)")
        feeds = {"input_ids": ids, "attention_mask": self._mask(inputs.get("attention_mask"), batch, past_len + seq)}
        if inputs.get(SEGMENTS) is not None:
            segments = self._segments(inputs[SEGMENTS], ids.shape)
            if segments is not None:
                feeds[SEGMENTS] = segments
        feeds.update(past)
        return feeds

    def _ids(self, value: Any) -> np.ndarray:
        ids = as_ints(value, "input_ids")
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or 0 in ids.shape:
            raise InputError(f"input_ids has shape {list(ids.shape)}; pass (batch, sequence) or (sequence,) with "
                             "at least one token")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            row, col = (int(x) for x in np.argwhere(ids == bad)[0])
            raise InputError(f"input_ids[{row}, {col}] = {bad} is outside the vocabulary 0..{self.vocab_size - 1}; "
                             "use this deployment's tokenizer")
        return ids.astype(np.int64, copy=False)

    @staticmethod
    def _mask(mask: Any, batch: int, width: int) -> np.ndarray:
        if mask is None:
            return np.ones((batch, width), np.int64)
        m = as_ints(mask, "attention_mask", bools=True)
        if m.ndim == 1 and batch == 1:
            m = m[None, :]
        if m.shape != (batch, width):
            raise InputError(f"attention_mask has shape {list(m.shape)}; it must be {[batch, width]} (one entry per "
                             "token, past tokens included)")
        if ((m != 0) & (m != 1)).any():
            raise InputError("attention_mask must hold only 0 and 1")
        return m.astype(np.int64, copy=False)

    def _segments(self, value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        segments = as_ints(value, SEGMENTS)
        segments = segments[None, :] if segments.ndim == 1 else segments
        if segments.shape != shape:
            raise InputError(f"{SEGMENTS} has shape {list(segments.shape)}; it must be input_ids' {list(shape)}")
        if SEGMENTS in self.io.inputs:
            return segments.astype(np.int64, copy=False)
        if segments.any():
            raise InputError(f"{SEGMENTS} holds segments other than 0, but this engine takes one segment (it was "
                             f"exported without {SEGMENTS}); pass single-segment input")
        return None

    def _past(self, inputs: Mapping[str, Any], batch: int) -> tuple[dict[str, np.ndarray], int]:
        """Decoders: the KV cache inputs (all given, checked, or all empty) and the past length."""
        given = [n for n in self.past_names if inputs.get(n) is not None]
        heads, dim = self.io.num_kv_heads, self.io.head_dim
        if not given:
            return {n: np.zeros((batch, heads, 0, dim), self.past_dtypes[n]) for n in self.past_names}, 0
        if len(given) != len(self.past_names):
            raise InputError(f"pass all {len(self.past_names)} {PAST}* inputs or none (got {len(given)})")
        out: dict[str, np.ndarray] = {}
        lengths = set()
        for n in self.past_names:
            a = np.asarray(inputs[n])
            want = self.past_dtypes[n]
            if a.dtype != want or a.ndim != 4 or a.shape[0] != batch or a.shape[1] != heads or a.shape[3] != dim:
                raise InputError(f"{n} is {a.dtype} {list(a.shape)}; it must be {want} [{batch}, {heads}, past, {dim}]")
            lengths.add(a.shape[2])
            out[n] = a
        if len(lengths) != 1:
            raise InputError(f"{PAST}* inputs disagree on the past length; pass one cache")
        return out, lengths.pop()
