"""Latency of an ONNX Runtime session: median of many runs after warm-up, at fixed threads.

Shared by ``edgelora export`` (the report) and ``edgelora bench``. Inputs are the target's shape:
encoders take ``batch × sequence`` token ids; decoders take one decode step (one new token) with a
KV cache of ``sequence - 1`` past positions, i.e. the cost of each generated token at that context.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def timeit(fn: Callable[[], Any], warmup: int = 5, runs: int = 30) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": runs}


def latency_inputs(sess: Any, spec: dict[str, Any], batch: int, sequence: int, vocab_size: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for one timed call: a full encoder batch, or one decode step at context ``sequence``."""
    rng = np.random.default_rng(seed)
    if spec["kind"] != "causal-lm":
        ids = rng.integers(min(1000, vocab_size // 2), vocab_size, size=(batch, sequence), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    past = sequence - 1
    dtype = np.float16 if any(i.type == "tensor(float16)" for i in sess.get_inputs()
                              if i.name.startswith("past_key_values.")) else np.float32
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(5, vocab_size, size=(batch, 1), dtype=np.int64),
        "attention_mask": np.ones((batch, sequence), dtype=np.int64),
    }
    for name in spec["inputs"]:
        if name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal((batch, spec["num_kv_heads"], past, spec["head_dim"])).astype(dtype)
    return feeds


def session_latency(sess: Any, feeds: dict[str, np.ndarray], warmup: int = 5, runs: int = 30) -> dict[str, float]:
    return timeit(lambda: sess.run(None, feeds), warmup, runs)


def cpu_info() -> dict[str, Any]:
    """The CPU a measurement ran on: model name and the flags that decide int8 and fp32 speed (AVX2, AVX-512,
    VNNI, AMX). Machines of one pool differ (int8 ran 1.4x vs 2.3x fp32 on AVX2 vs VNNI/AMX)."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    from .runtime.cpu import measured_int8_path

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    int8 = measured_int8_path()
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "int8_path": {"kernel": int8.kernel,
                          "saturates": int8.saturates if int8.measured is None else int8.measured}}


def cpu_line() -> str:
    from .runtime.cpu import measured_int8_path

    info = cpu_info()
    flags = " ".join(info["flags"]) or "none of AVX2/AVX-512/AMX"
    return f"CPU: {info['model']}, {info['cores']} cores, flags: {flags}; {measured_int8_path().line()}"
