"""Reading a deployment folder on the device: the manifest and memory-mapped safetensors files.

No safetensors package here: the format is an 8-byte header length, a JSON header and raw little-endian
tensor bytes, so a ``numpy.memmap`` gives zero-copy, read-only arrays whose pages load on first use.
Never unpickles anything.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeloraError

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": None, "F64": "<f8", "I8": "i1", "U8": "u1", "I32": "<i4",
           "I64": "<i8"}


class DeltaError(EdgeloraError):
    """A delta file that cannot be used with this deployment (corrupt, other base, wrong shapes)."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeloraError(f"{path}: no {what}; is this a folder written by edgelora export?") from None
    except (OSError, ValueError) as exc:
        raise EdgeloraError(f"{path}: unreadable {what} ({exc}); re-run edgelora export") from None
    if not isinstance(data, dict):
        raise EdgeloraError(f"{path}: {what} is not a JSON object; re-run edgelora export")
    return data


def mmap_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as read-only memory-mapped arrays, metadata). Raises DeltaError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DeltaError(f"{path}: no such delta file") from None
    except (OSError, ValueError) as exc:
        raise DeltaError(f"{path}: not a safetensors file ({exc}); re-export the task") from None
    if not isinstance(header, dict):
        raise DeltaError(f"{path}: safetensors header is not a JSON object; re-export the task")
    meta = header.pop("__metadata__", None) or {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            if dtype is None:
                raise ValueError(f"dtype {info['dtype']} is not supported (use F32)")
            count = int(np.prod(shape, dtype=np.int64))
            if not 0 <= start <= stop <= size - 8 - n or stop - start != count * np.dtype(dtype).itemsize:
                raise ValueError(f"data offsets {start}..{stop} do not fit shape {list(shape)} in the file")
            tensors[name] = mm[8 + n + start:8 + n + stop].view(dtype).reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise DeltaError(f"{path}: tensor {name!r}: {exc}; re-export the task") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}
