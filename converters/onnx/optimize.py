"""ONNX -> fused ONNX: ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusions).

Applied where a fusion exists for the family: BERT-style encoders (``model_type="bert"``). Decoders
are left to ONNX Runtime's own session-level graph optimizations: the transformer optimizer's
decoder fusions target its own GPT-2 / LLaMA export scripts and do not match the plain torch
trace with an explicit cache, so running it there only renames nodes.

API: ``optimize(src, dst, family, config) -> bool`` (True when a fusion pass ran).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

ENCODER_FAMILIES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert"}


def fusion_model_type(family: str) -> str | None:
    """The transformer optimizer's model_type for an HF ``model_type``, or None where none applies."""
    return ENCODER_FAMILIES.get(family)


def optimize(src: Path, dst: Path, family: str, config: Any) -> bool:
    """Fuse ``src`` into ``dst``; returns False (and writes nothing) when the family has no fusion."""
    model_type = fusion_model_type(family)
    if model_type is None:
        return False
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    # The attention mask is 0/1 int64 per token, as the tokenizer gives it.
    options.use_raw_attention_mask(True)
    logging.disable(logging.WARNING)  # its fusion modules log notes to stdout (breaks --json)
    try:
        model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, optimization_options=options, opt_level=0,
                                         use_gpu=False, only_onnxruntime=False)
        model.save_model_to_file(str(dst))
    finally:
        logging.disable(logging.NOTSET)
    return True
