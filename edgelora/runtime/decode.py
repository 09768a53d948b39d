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
the context: seen tokens are a boolean mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EdgeloraError, InputError


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
        number = (int, float)
        if not (isinstance(temperature, number) and temperature >= 0):
            raise InputError(f"temperature = {temperature!r}; pass a number ≥ 0 (0: greedy)")
        if not (isinstance(top_p, number) and 0 < top_p <= 1):
            raise InputError(f"top_p = {top_p!r}; pass a number in (0, 1]")
        if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
            raise InputError(f"top_k = {top_k!r}; pass an integer ≥ 0 (0: no top-k)")
        if not (isinstance(repetition_penalty, number) and repetition_penalty > 0):
            raise InputError(f"repetition_penalty = {repetition_penalty!r}; pass a number > 0 (1: none)")
        if not all(isinstance(s, (int, np.integer)) and s >= 0 for s in stop):
            raise InputError(f"stop tokens {list(stop)!r}; pass token ids (integers ≥ 0)")
        return cls(float(temperature), float(top_p), int(top_k), float(repetition_penalty),
                   frozenset(int(s) for s in stop))


class Sampler:
    def __init__(self, sampling: Sampling, vocab: int, prompt: np.ndarray, seed: int | None) -> None:
        self.s = sampling
        self.rng = np.random.default_rng(seed)
        self.seen: np.ndarray | None = None
        if sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[prompt[(prompt >= 0) & (prompt < vocab)]] = True

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.temperature == 0:
            token = int(np.argmax(self.penalized(logits)))
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
        out = logits.copy()
        hit = out[self.seen]
        out[self.seen] = np.where(hit > 0, hit / self.s.repetition_penalty, hit * self.s.repetition_penalty)
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a sampled token is drawn from (float64 over the vocabulary, zero outside the kept
        tokens): penalty, temperature, top-k, then top-p."""
        s = self.s
        z = self.penalized(logits).astype(np.float64) / s.temperature
        if 0 < s.top_k < z.shape[0]:
            keep = np.argpartition(-z, s.top_k - 1)[:s.top_k]
        else:
            keep = np.arange(z.shape[0])
        p = np.exp(z[keep] - z[keep].max())
        p /= p.sum()
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
