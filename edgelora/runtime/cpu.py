"""Which integer kernel ONNX Runtime's CPU provider multiplies int8 weights with on this machine, and whether it
can saturate (Linux ``/proc/cpuinfo``; elsewhere the architecture alone).

ONNX Runtime (MLAS) picks its u8·s8 GEMM by CPU flags: AMX (``amx_int8``) and VNNI (``avx512_vnni``,
``avx_vnni``) accumulate products in 32 bits; AVX2 or AVX-512 without VNNI use ``vpmaddubsw``, which adds each
pair of u8·s8 products into a saturating 16-bit lane (exact only when ``|q[2k]| + |q[2k+1]| ≤ 128``, the
``int8-pairsafe`` recipe, or with 7-bit weights); ARM's kernels (dot product, or widening NEON) do not
saturate. Printed by ``edgelora bench`` and ``edgelora verify`` beside every int8 number.
"""

from __future__ import annotations

import base64
import functools
import platform
from dataclasses import dataclass

import numpy as np

# One MatMulInteger: uint8 A (1, 64) times a constant int8 B (64, 1) of 127s (written by the onnx package once;
# the runtime does not import it). With A all 255 the exact sum is 2,072,640; a saturating kernel gives 1,048,544.
_PROBE = base64.b64decode(
    "CAgSCGVkZ2Vsb3JhOpQBChgKAUEKAUISAVkiDU1hdE11bEludGVnZXISAXAqSwhACAEQA0IBQkpAf39/f39/f39/f39/f39/f39/f39/f39/"
    "f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f1oTCgFBEg4KDAgCEggKAggBCgIIQGITCgFZEg4KDAgGEggKAggBCgII"
    "AUIECgAQEQ==")


@dataclass(frozen=True)
class Int8Path:
    kernel: str  # AMX | AVX512-VNNI | AVX-VNNI | AVX-512 without VNNI | AVX2 without VNNI | ARM ... | other
    saturates: bool  # u8·s8 pairs in 16-bit lanes: full-range int8 weights can come back wrong
    measured: bool | None = None  # what ONNX Runtime's kernel did on the probe (None: not run)

    def line(self) -> str:
        sat = self.saturates if self.measured is None else self.measured
        how = ("u8·s8 pairs add in saturating 16-bit lanes: exact for pair-safe or 7-bit weights only"
               if sat else "32-bit accumulation, exact")
        seen = "" if self.measured is None else ", measured"
        kernel = self.kernel if self.measured in (None, self.saturates) else \
            f"{self.kernel} by the CPU flags, but the kernel measured otherwise (an emulator?)"
        return f"int8 path: {kernel} ({how}{seen})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``), empty where /proc/cpuinfo is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def int8_path(flags: set[str] | None = None, machine: str | None = None) -> Int8Path:
    """The u8·s8 GEMM ONNX Runtime's CPU provider runs here (``flags``/``machine``: this CPU's by default)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        kind = "ARM i8mm" if "i8mm" in flags else "ARM dot product" if "asimddp" in flags else "ARM NEON (widening)"
        return Int8Path(kind, False)
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return Int8Path(f"{machine or 'unknown'} (not checked)", False)
    if "amx_int8" in flags:
        return Int8Path("AMX", False)
    if "avx512_vnni" in flags and "avx512bw" in flags:
        return Int8Path("AVX512-VNNI", False)
    if "avx_vnni" in flags:
        return Int8Path("AVX-VNNI", False)
    if "avx512bw" in flags:
        return Int8Path("AVX-512 without VNNI", True)
    if "avx2" in flags:
        return Int8Path("AVX2 without VNNI", True)
    return Int8Path("SSE (no AVX2)", True)  # MLAS's SSE4.1 u8·s8 kernel also uses pmaddubsw


@functools.cache
def kernel_saturates() -> bool | None:
    """Run the probe through ONNX Runtime's CPU provider here: True when its u8·s8 kernel saturated, None when
    onnxruntime is missing or refused the probe. Emulators report the host's flags but run the guest's kernels,
    so this, not the flags, is what a conformance check trusts."""
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(_PROBE, opts, providers=["CPUExecutionProvider"])
        got = int(sess.run(None, {"A": np.full((1, 64), 255, np.uint8)})[0][0, 0])
    except Exception:  # noqa: BLE001 - a probe that cannot run says nothing
        return None
    return got != 255 * 127 * 64


def measured_int8_path() -> Int8Path:
    """:func:`int8_path` with the probe's answer."""
    path = int8_path()
    return Int8Path(path.kernel, path.saturates, kernel_saturates())
