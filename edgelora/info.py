"""``edgelora inspect``: what an adapter (or a model folder) is, as plain data."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from . import names
from .adapter import CONFIG_NAME, load_adapter
from .base import MERGED_MARKER, fingerprint, read_config, resolve_base, task_from_peft, weight_files
from .errors import EdgeloraError
from .hashing import read_safetensors_header


def _task_name(task_type: str | None) -> str | None:
    try:
        return task_from_peft(task_type)
    except EdgeloraError:
        return task_type


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def describe_adapter(path: str | os.PathLike[str], *, base: str | None = None, allow_pickle: bool = False
                     ) -> dict[str, Any]:
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    cfg = adapter.config
    ranks = {m.name: m.rank for m in adapter.modules.values()}
    scales = sorted({round(m.scale, 8) for m in adapter.modules.values()})
    lora_params = sum(m.A.numel() + m.B.numel() + (m.magnitude.numel() if m.magnitude is not None else 0)
                      + (m.bias.numel() if m.bias is not None else 0) for m in adapter.modules.values())
    record = adapter.record
    out: dict[str, Any] = {
        "kind": "adapter",
        "path": str(path),
        "task": record.task if record and record.task else _task_name(cfg.task_type),
        "rank": cfg.r,
        "alpha": cfg.lora_alpha,
        "scale": scales[0] if len(scales) == 1 else scales,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "targets": sorted({names.short_name(m) for m in adapter.modules}),
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules or []),
        "lora_modules": len(adapter.modules),
        "ranks": sorted(set(ranks.values())),
        "modules_to_save": sorted(adapter.replacements),
        "pooling": (record.pooling if record and record.pooling else "cls") if adapter.replacements else None,
        "trainable_parameters": adapter.num_parameters,
        "lora_parameters": lora_params,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()}),
        "size_bytes": _folder_size(Path(path)),
        "adapter_hash": adapter.content_hash(),
        "base": (record.base if record and record.base else cfg.base_model_name_or_path),
        "base_fingerprint": record.base_fingerprint if record else None,
        "labels": list(record.labels) if record and record.labels else None,
        "metrics": (dict(record.metrics["history"][-1]) if record and record.metrics.get("history") else None),
    }
    if base is not None:
        from .prepare import prepare

        prepared = prepare(base, adapter)
        total = sum(p.numel() for p in prepared.model.parameters())
        out["base_check"] = {
            "base": str(prepared.base_path),
            "fingerprint": prepared.base_fingerprint,
            "fits": True,
            "trainable_percent": round(100.0 * adapter.num_parameters / total, 4),
        }
    return out


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    folder = resolve_base(path)
    cfg = read_config(folder)
    files = weight_files(folder)
    params = 0
    for f in files:
        header, _ = read_safetensors_header(f)
        params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return {
        "kind": "model",
        "path": str(folder),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "parameters": params,
        "size_bytes": sum(f.stat().st_size for f in files),
        "fingerprint": fingerprint(folder),
        "merged_adapter": cfg.get(MERGED_MARKER),
    }


def describe(path: str | os.PathLike[str], *, base: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return describe_adapter(p, base=base, allow_pickle=allow_pickle)
    if p.is_dir() and (p / "config.json").is_file():
        return describe_model(p)
    if not p.exists():
        raise EdgeloraError(f"{p} does not exist; pass an adapter folder or a model folder")
    raise EdgeloraError(f"{p} is neither a PEFT adapter folder ({CONFIG_NAME}) nor an HF model folder (config.json)")
