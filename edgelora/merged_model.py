"""``edgelora merge``: write a normal HF model folder with the adapter folded into its weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import MERGED_MARKER
from .fsutil import atomic_output_dir
from .merge import merge_into_model
from .prepare import Prepared

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


MEAN_POOLING_CODE = "modeling_edgelora.py"


def write_mean_pooling_code(folder: Path) -> None:
    """Make a saved mean-pooling classifier load as itself: its class's code beside the weights, named in
    ``config.json``'s ``auto_map`` under its own ``model_type``, so that
    ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` runs the mean
    and transformers refuses the folder without ``trust_remote_code`` (it would run its CLS head)."""
    import json

    from . import modeling_edgelora as m

    shutil.copy2(m.__file__, folder / MEAN_POOLING_CODE)
    module = Path(MEAN_POOLING_CODE).stem
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config |= {"model_type": m.MERGED_MODEL_TYPE, "architectures": [m.MergedBertMeanPooling.__name__],
               "auto_map": {"AutoConfig": f"{module}.{m.BertMeanPoolingConfig.__name__}",
                            "AutoModelForSequenceClassification": f"{module}.{m.MergedBertMeanPooling.__name__}"},
               m.POOLING_CONFIG_FIELD: "mean"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_merged_model(prepared: Prepared, output: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Merge in fp32 and save with ``save_pretrained`` (safetensors) plus the base's tokenizer.

    The saved ``config.json`` records which adapter was merged, so the folder is never used as a
    base for another merge (that would add a second ΔW on top of the first). A mean-pooling classifier
    also gets its class's code (:func:`write_mean_pooling_code`).
    """
    model = prepared.model
    merge_into_model(model, prepared.plan)
    setattr(
        model.config,
        MERGED_MARKER,
        {
            "adapter": prepared.plan.adapter_hash,
            "adapter_path": str(prepared.adapter.source) if prepared.adapter.source else None,
            "base_fingerprint": prepared.base_fingerprint,
        },
    )
    with atomic_output_dir(output, force=force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if prepared.head.pooling == "mean":
            write_mean_pooling_code(tmp)
        copy_tokenizer(prepared.base_path, tmp)
    return Path(output)
