"""The one safetensors reader of deployment files (deltas, W0), numpy only, strict about its input.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(plus an optional ``__metadata__`` of strings) and raw little-endian tensor bytes. The reader takes a byte
buffer (a file read into memory and checked against the manifest's sha256, or a read-only memory map) and
returns zero-copy numpy views. Every field of the header is checked before it is used: a dimension of 2**70,
offsets that run past the buffer or do not match the shape, an unknown dtype, a header that is not a JSON
object -> one :class:`DeploymentError` (or the class the caller passes) naming the file and the tensor.
Never unpickles anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DeploymentError

# safetensors dtype code -> numpy dtype (BF16 and the float8 codes have no numpy dtype: refused)
DTYPES: Mapping[str, str] = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                             "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def parse(buf: Any, where: str, error: type[DeploymentError] = DeploymentError
          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as read-only views of ``buf``, metadata) of a safetensors image in ``buf`` (bytes, memoryview,
    mmap or a uint8 array). Raises ``error`` with ``where`` (the file) in its one-line message."""
    data = np.frombuffer(buf, dtype=np.uint8)
    size = int(data.size)
    if size < 8:
        raise error(f"{where}: not a safetensors file ({size} bytes, shorter than its header length); re-export it")
    (n,) = struct.unpack("<Q", data[:8].tobytes())
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise error(f"{where}: not a safetensors file (header length {n} runs past the end of its {size} bytes); "
                    "re-export it")
    try:
        header = json.loads(data[8:8 + n].tobytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{where}: not a safetensors file (header is not JSON: {_short(exc)}); re-export it") from None
    if not isinstance(header, dict):
        raise error(f"{where}: not a safetensors file (header is not a JSON object); re-export it")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise error(f"{where}: safetensors __metadata__ must map strings to strings; re-export it")
    body = data[8 + n:]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        tensors[name] = _view(body, name, info, where, error)
    return tensors, dict(meta)


def _view(body: np.ndarray, name: str, info: Any, where: str, error: type[DeploymentError]) -> np.ndarray:
    def bad(why: str) -> DeploymentError:
        return error(f"{where}: tensor {name!r}: {why}; re-export it")

    if not isinstance(info, dict):
        raise bad("its header entry is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise bad(f"dtype {_short(code)} is not one of {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"data_offsets {_short(offsets)} is not [start, end]")
    start, stop = offsets
    dtype = np.dtype(DTYPES[code])
    count = 1
    for d in shape:  # Python integers: a dimension of 2**70 cannot overflow, it just does not fit
        count *= d
    if not start <= stop <= body.size or stop - start != count * dtype.itemsize:
        raise bad(f"data offsets {start}..{stop} do not hold shape {shape} of {code} within the file's "
                  f"{body.size} data bytes")
    return body[start:stop].view(dtype).reshape(shape)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, BaseException) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


_WRITE_CODES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}


def write(tensors: Mapping[str, np.ndarray], path: Any, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file of float32 tensors (integers as int64), byte for byte the same for the same input
    (sorted header, sorted data): re-running an export must be harmless and reproducible
    (``safetensors.numpy.save_file`` orders its metadata by hash, so two exports of the same adapter would differ)."""
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a, dtype="<i8" if a.dtype.kind in "iub" else "<f4")
        header[name] = {"dtype": _WRITE_CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        chunks.append(a.tobytes())
        offset += a.nbytes
    header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)
