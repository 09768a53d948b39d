"""Bring a base and an adapter together: resolve, fingerprint, load for the task, validate.

Every command that uses an adapter on a base (merge, export, inspect --base) starts here, so the
checks run in one place and before any work is written.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, load_adapter
from .base import (
    MERGED_MARKER,
    HeadSpec,
    fingerprint,
    infer_task,
    load_model,
    read_config,
    resolve_base,
    task_from_peft,
)
from .errors import EdgeloraError, EdgeloraWarning
from .validate import MergePlan, check_fingerprint, infer_head, plan_merge


@dataclass(frozen=True)
class Prepared:
    base_path: Path
    base_fingerprint: str
    task: str
    head: HeadSpec
    adapter: Adapter
    model: Any  # transformers PreTrainedModel, fp32, eval mode, adapter NOT merged
    plan: MergePlan


def prepare(
    base: str | os.PathLike[str] | None,
    adapter: str | os.PathLike[str] | Adapter,
    *,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Prepared:
    """Load ``base`` for ``adapter``'s task and check the adapter fits it (nothing is merged).

    ``progress(step)`` is called as each step starts (for a progress bar).
    """
    report = progress or (lambda step: None)
    report("reading adapter")
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    report("fingerprinting base")
    base_path = resolve_base(base)
    marker = read_config(base_path).get(MERGED_MARKER)
    if marker:
        raise EdgeloraError(
            f"base {base_path} already has an adapter merged into it by edgelora "
            f"({marker.get('adapter', '?') if isinstance(marker, dict) else marker}); "
            "merge into the original base instead"
        )
    fp = fingerprint(base_path)
    check_fingerprint(adapter, fp, str(base if base is not None else "(bundled)"))
    task = task_of(adapter, base_path)
    head = infer_head(adapter, base_path, task)
    report("loading base")
    model = load_model(base_path, task, head)
    report("validating adapter against base")
    plan = plan_merge(adapter, model)
    return Prepared(base_path, fp, task, head, adapter, model, plan)


def task_of(adapter: Adapter, base_path: Path) -> str:
    """The adapter's task: its ``task_type``, or, where PEFT saved none (its default), inferred from what the
    adapter and the base say, with a warning that names the evidence."""
    if adapter.config.task_type is not None:
        return task_from_peft(adapter.config.task_type)
    if adapter.record is not None and adapter.record.task:
        return adapter.record.task
    task, how = infer_task(base_path, adapter.config.raw.get("auto_mapping"), sorted(adapter.modules),
                           sorted(adapter.replacements))
    warnings.warn(f"{adapter.source or 'adapter'}: adapter_config.json has no task_type; merging it as {task} "
                  f"({how}), as PEFT's merge_and_unload would on that model", EdgeloraWarning, stacklevel=2)
    return task
