"""Token generation: the sampler and the decode loop over a decoder engine.

Two loops, by the engine's ``io.kv_cache``:

- ``shared`` (GroupQueryAttention graphs, ``decoder_graph = "genai-builder"``): each layer's key and value cache
  is one buffer of ``prompt + max_new_tokens`` positions, allocated once per call and bound with ONNX Runtime's
  IO binding as both ``past_key_values.*`` and ``present.*``: the engine writes each step's keys and values in
  place, nothing is concatenated or copied. The step's token id, the logits and the weights a mode feeds
  (swap slots, LoRA branches) are bound once too. Per step the Python work is constant: one id written, one
  view of the attention mask bound (its length is the sequence so far), one run, one sample over the vocabulary.
- ``concat`` (traced graphs): ``present`` is the past plus the new positions and is fed back as the next past.

The sampler: greedy at ``temperature = 0``; else repetition penalty (CTRL's: a seen token's logit divided by the
penalty when positive, multiplied when negative), temperature, top-k, top-p, in that order — the order
transformers' ``generate`` applies them — then one draw. Every step's work is over the vocabulary, never over
the context: seen tokens are a boolean mask. The softmax is taken in float64 as ``exp((z - max z) / T)``, so no
temperature or penalty can make it NaN: a temperature so small that ``(z - max z) / T`` overflows gives every
token but the likeliest probability 0 (greedy, the limit of ``T → 0``), and a penalty so extreme that penalized
logits overflow to ±inf puts the mass where the finite case tends (see :func:`softmax`).

Several prompts (a ``(batch, sequence)`` array or a list of id lists) are generated one after another, each from
its own fresh sampler (same seed), so each row's tokens are exactly what that prompt generates alone: the traced
graphs take no position ids, so padding rows of different lengths into one batch would shift their positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EdgeloraError, InputError
from .inputs import as_ints


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: frozenset[int] = frozenset()

    @classmethod
    def checked(cls, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                stop: Sequence[int]) -> Sampling:
        if not (_real(temperature) and temperature >= 0):
            raise InputError(f"temperature = {temperature!r}; pass a finite number ≥ 0 (0: greedy)")
        if not (_real(top_p) and 0 < top_p <= 1):
            raise InputError(f"top_p = {top_p!r}; pass a number in (0, 1]")
        if not (_integer(top_k) and top_k >= 0):
            raise InputError(f"top_k = {top_k!r}; pass an integer ≥ 0 (0: no top-k)")
        if not (_real(repetition_penalty) and repetition_penalty > 0):
            raise InputError(f"repetition_penalty = {repetition_penalty!r}; pass a finite number > 0 (1: none)")
        if not all(_integer(s) and s >= 0 for s in stop):
            raise InputError(f"stop tokens {list(stop)!r}; pass token ids (integers ≥ 0)")
        return cls(float(temperature), float(top_p), int(top_k), float(repetition_penalty),
                   frozenset(int(s) for s in stop))


def _real(x: object) -> bool:
    """A finite int or float (not a bool, not NaN or ±inf): every sampling number must be one."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def prompt_rows(prompt_ids: Any) -> tuple[list[np.ndarray], bool]:
    """The prompts a ``generate`` call asks for, each a ``(1, sequence)`` int64 row, and whether it asked for
    several (then it returns one list per prompt): a ``(sequence,)`` array or list of ids is one prompt, a
    ``(batch, sequence)`` array or a list of id lists (of any lengths) is ``batch`` prompts."""
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim == 1:
            return [as_ints(prompt_ids, "prompt_ids").reshape(1, -1)], False
        if prompt_ids.ndim != 2 or 0 in prompt_ids.shape:
            raise InputError(f"prompt_ids has shape {list(prompt_ids.shape)}; pass (sequence,) for one prompt or "
                             "(batch, sequence) for several, each with at least one token")
        return [as_ints(row, f"prompt_ids[{i}]").reshape(1, -1) for i, row in enumerate(prompt_ids)], True
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise InputError(f"prompt_ids is a {type(prompt_ids).__name__}; pass token ids (a list or an array; "
                         "generate_text takes text)")
    nested = [isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, (str, bytes)) for p in prompt_ids]
    if not any(nested):
        return [as_ints(list(prompt_ids), "prompt_ids").reshape(1, -1)], False
    if not all(nested):
        raise InputError("prompt_ids mixes token ids and lists of ids; pass one list of ids, or a list of lists "
                         "(one per prompt)")
    rows = []
    for i, p in enumerate(prompt_ids):
        row = as_ints(list(p) if not isinstance(p, np.ndarray) else p, f"prompt_ids[{i}]")
        if row.ndim != 1:
            raise InputError(f"prompt_ids[{i}] has shape {list(row.shape)}; each prompt is one list of ids")
        rows.append(row.reshape(1, -1))
    return rows, True


def softmax(z: np.ndarray, temperature: float, logits: np.ndarray) -> np.ndarray:
    """``exp((z - max z) / T)``, normalized, float64 — never NaN for finite ``T > 0`` and any ``z`` without NaN:
    ``z - max z ≤ 0``, so dividing by a tiny ``T`` can only underflow to 0 (or overflow to -inf, whose exp is 0).

    Where the maximum is infinite, a penalty overflowed float64 (below ~1e-307 a seen token's positive logit
    went to +inf; above ~1e307, with every kept token seen, the negative ones all went to -inf). Such a penalty
    is far past the point where the penalized logits' gaps, ``(x_i - x_j) / penalty``, dwarf any temperature,
    so the answer is the limit of the finite case: all the mass on the token(s) at the maximum whose logit
    before the penalty (``logits``, aligned with ``z``) is largest."""
    top = z.max()
    if np.isinf(top):
        at = z == top
        p = (at & (logits == logits[at].max())).astype(np.float64)
    else:
        with np.errstate(over="ignore", under="ignore"):
            p = np.exp((z - top) / temperature)
    return p / p.sum()


class Sampler:
    def __init__(self, sampling: Sampling, vocab: int, prompt: np.ndarray, seed: int | None) -> None:
        self.s = sampling
        self.rng = np.random.default_rng(seed)
        self.seen: np.ndarray | None = None
        if sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[prompt[(prompt >= 0) & (prompt < vocab)]] = True

    def __call__(self, logits: np.ndarray) -> int:
        if np.isnan(logits.max()):  # max propagates NaN: one pass over the vocabulary
            raise EdgeloraError("the engine returned NaN logits; run `edgelora verify` on the folder (its weights or "
                                "engine may be damaged)")
        if self.s.temperature == 0:
            z = self.penalized(logits)
            token = int(np.argmax(z if not np.isinf(z.max()) else softmax(z, 1.0, logits)))
        else:
            p = self.probabilities(logits)
            token = int(self.rng.choice(p.shape[0], p=p))
        if self.seen is not None and token < self.seen.shape[0]:
            self.seen[token] = True
        return token

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """The logits after the repetition penalty (unchanged without one)."""
        if self.seen is None:
            return logits
        out = logits.astype(np.float64)  # a copy; float64 so a penalty of 1e-30 boosts 3.0 to 3e30, not to inf
        hit = out[self.seen]
        with np.errstate(over="ignore", under="ignore"):  # beyond float64: ±inf or 0, which softmax() handles
            out[self.seen] = np.where(hit > 0, hit / self.s.repetition_penalty, hit * self.s.repetition_penalty)
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a sampled token is drawn from (float64 over the vocabulary, zero outside the kept
        tokens): penalty, temperature, top-k, then top-p."""
        s = self.s
        z = np.asarray(self.penalized(logits), np.float64)  # top-k on z = top-k on z / T (T > 0 keeps the order)
        if 0 < s.top_k < z.shape[0]:
            if np.isinf(z.max()):  # ties at an overflowed maximum: the larger logit before the penalty first
                keep = np.lexsort((-logits, -z))[:s.top_k]
            else:
                keep = np.argpartition(-z, s.top_k - 1)[:s.top_k]
        else:
            keep = np.arange(z.shape[0])
        p = softmax(z[keep], s.temperature, logits[keep])
        if s.top_p < 1:
            order = np.argsort(-p, kind="stable")
            kept = order[np.cumsum(p[order]) - p[order] < s.top_p]  # the smallest set whose mass reaches top_p
            keep, p = keep[kept], p[kept] / p[kept].sum()
        out = np.zeros(z.shape[0])
        out[keep] = p
        return out


def shared_cache_loop(sess: Any, io: Any, extra: Mapping[str, np.ndarray], prompt: np.ndarray, max_new: int,
                      sampler: Sampler, stream: Callable[[int], Any] | None, folder: Any) -> list[int]:
    """Generate on a ``kv_cache = "shared"`` engine (see the module doc). ``extra``: the mode's fixed feeds."""
    import onnxruntime as ort

    capacity = prompt.shape[1] + max_new
    dtype = np.float32
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values.") and "float16" in i.type:
            dtype = np.float16
    binding = sess.io_binding()
    keep: list[Any] = []  # numpy arrays and OrtValues the binding points into, alive until the call ends

    def bind_in(name: str, arr: np.ndarray) -> None:
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        keep.append((arr, value))
        binding.bind_ortvalue_input(name, value)

    binding.bind_output("logits")  # first: get_outputs() lists outputs in the order they were bound
    for i in range(io.num_layers):
        for kv in ("key", "value"):
            cache = np.zeros((1, io.num_kv_heads, capacity, io.head_dim), dtype)
            value = ort.OrtValue.ortvalue_from_numpy(cache)
            keep.append((cache, value))
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", value)
            binding.bind_ortvalue_output(f"present.{i}.{kv}", value)
    for name, arr in extra.items():
        bind_in(name, np.ascontiguousarray(arr))
    mask = np.ones((1, capacity), np.int64)

    def run() -> None:
        try:
            sess.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types; the inputs were checked
            raise EdgeloraError(f"{folder}: the engine failed while generating ({' '.join(str(exc).split())[:300]}); "
                                f"run `edgelora verify {folder}`") from None

    # prefill: the whole prompt in one run; its logits are the engine's to allocate (prompt × vocabulary)
    bind_in("input_ids", np.ascontiguousarray(prompt, np.int64))
    length = prompt.shape[1]
    bind_in("attention_mask", mask[:, :length])
    run()
    first = binding.get_outputs()[0].numpy()[0, -1]
    new: list[int] = []
    if max_new == 0:
        return new
    token = sampler(first)
    step_ids = np.zeros((1, 1), np.int64)
    bind_in("input_ids", step_ids)
    logits = np.empty((1, 1, first.shape[-1]), np.float32)
    out = ort.OrtValue.ortvalue_from_numpy(logits)
    keep.append(out)
    binding.bind_ortvalue_output("logits", out)
    while True:
        new.append(token)
        if stream is not None:
            stream(token)
        if token in sampler.s.stop or len(new) == max_new:
            return new
        step_ids[0, 0] = token
        length += 1
        view = mask[:, :length]
        value = ort.OrtValue.ortvalue_from_numpy(view)
        binding.bind_ortvalue_input("attention_mask", value)
        run()
        del value
        token = sampler(logits[0, -1])
