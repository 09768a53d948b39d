"""Content hashes of tensors: the base fingerprint and the adapter hash.

A digest covers, for every tensor in name order, its name, dtype, shape and raw little-endian
bytes. It does not depend on how the tensors are laid out in files (one file or shards, header
order, metadata), so the same weights always give the same fingerprint.

Files are hashed straight from the safetensors layout (8-byte header length, JSON header, data),
memory-mapped, without torch: the on-device runtime can check a fingerprint with this module.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import EdgeloraError

# torch dtype name -> safetensors dtype code (the codes are what the digest records)
_TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _update(h: Any, name: str, dtype: str, shape: Sequence[int], data: bytes | memoryview) -> None:
    head = json.dumps([name, dtype, list(shape)], separators=(",", ":")).encode()
    h.update(struct.pack("<Q", len(head)))
    h.update(head)
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header dict, byte offset where the data section starts). Raises EdgeloraError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise EdgeloraError(f"{path} is not a safetensors file (too short); re-export or re-download it")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise EdgeloraError(f"{path} has a corrupt safetensors header (length {n}); re-download it")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        if isinstance(exc, EdgeloraError):
            raise
        raise EdgeloraError(f"cannot read {path} as safetensors ({exc}); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise EdgeloraError(f"{path} has a corrupt safetensors header; re-download it")
    return header, 8 + n


def fingerprint_files(paths: Iterable[Path]) -> str:
    """sha256 over all tensors of the given safetensors files, in name order."""
    entries: list[tuple[str, Path, int, dict[str, Any]]] = []
    for path in paths:
        header, start = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries.append((name, path, start, info))
    entries.sort(key=lambda e: e[0])
    h = hashlib.sha256()
    maps: dict[Path, mmap.mmap] = {}
    files = []
    try:
        for name, path, start, info in entries:
            if path not in maps:
                f = open(path, "rb")
                files.append(f)
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            begin, end = info["data_offsets"]
            view = memoryview(maps[path])[start + begin : start + end]
            if len(view) != end - begin:
                raise EdgeloraError(f"{path} is truncated (tensor {name!r} ends past the file); re-download it")
            _update(h, name, info["dtype"], info["shape"], view)
            view.release()
    finally:
        for m in maps.values():
            m.close()
        for f in files:
            f.close()
    return h.hexdigest()


def hash_tensors(tensors: Mapping[str, Any], extra: bytes = b"") -> str:
    """sha256 over in-memory torch tensors; equals :func:`fingerprint_files` of the same tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _TORCH_TO_ST.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
        import torch  # local: the runtime never reaches this function

        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        _update(h, name, dtype, tuple(t.shape), data)
    h.update(extra)
    return h.hexdigest()
