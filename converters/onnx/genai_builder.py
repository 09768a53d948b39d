"""torch decoder -> ONNX Runtime GenAI's model builder graph (``decoder_graph = "genai-builder"`` targets).

The builder (``onnxruntime_genai.models.builder``, the optional ``genai`` extra) writes the decoder graph ONNX
Runtime GenAI runs: ``GroupQueryAttention`` with the rotary embedding inside it, ``SkipSimplifiedLayerNormalization``,
q/k/v fused into one MatMul, ``MatMulNBits`` for int4, the embedding read from the LM head's quantized blocks where
the model ties them. Its KV cache may be one preallocated buffer that is both ``past_key_values.{i}.*`` and
``present.{i}.*`` (``attention_mask`` says how much of it is valid), or grow by concatenation as the traced graph's.

Three builds of one model, each a builder run on the model saved as an HF folder:

- ``fp32``: the fused fp32 graph: the name map is built on it (q/k/v are slices of one packed weight, found by
  content as for any fused graph), and it is the engine of fp32 targets;
- ``raw``: the same graph with q/k/v unfused (``fuse_qkv=false``), where LoRA branches are added
  (``base/lora.onnx``), only when the target writes a branch graph;
- ``final``: the int4 graph (``MatMulNBits`` blocks by the target's ``[quantization]``) for int4 targets.

Task engines are the base engine with patched weights (``patch.py``): the builder's int4 blocks are ONNX Runtime's
own kernel's, which the patcher checks byte for byte before it trusts its re-encoding.

API: ``build(model, work, stem, target) -> (final, fp32, raw, spec)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError

from .export import OnnxGraphSpec, cache_names, decoder_geometry

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
INLINE_LIMIT = 1_800_000_000  # protobuf's 2 GB limit on one file, with room for the graph
FAMILIES = ("llama", "qwen2", "mistral")  # the builder knows more; these are the ones checked here


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def build(model: Any, work: Path, stem: str, target: Any) -> tuple[Path, Path, Path, dict[str, Any]]:
    family = getattr(model.config, "model_type", "")
    if family not in FAMILIES:
        raise EdgeloraError(f"target {target.name}: decoder_graph = 'genai-builder' builds {', '.join(FAMILIES)} "
                            f"decoders, not {family!r}; choose a target with decoder_graph = 'trace' (cpu-fp32, "
                            "cpu-int4)")
    _, _, head_dim = decoder_geometry(model.config)
    if head_dim % 16:
        raise EdgeloraError(f"target {target.name}: ONNX Runtime's GroupQueryAttention needs a head size that is a "
                            f"multiple of 16, and this {family} model's is {head_dim}; choose a target with "
                            "decoder_graph = 'trace' (cpu-fp32, cpu-int4)")
    if not available():
        raise EdgeloraError(f"target {target.name} builds its decoder graph with ONNX Runtime GenAI's model builder, "
                            "which is not installed; pip install 'edgelora[genai]' (onnxruntime-genai), or choose "
                            "cpu-fp32 / cpu-int4")
    hf = work / f"{stem}.hf"
    _save_hf(model, hf)
    fp32 = _run(hf, work / f"{stem}.gqa-fp32", "fp32", {})
    raw = _run(hf, work / f"{stem}.gqa-unfused", "fp32", {"fuse_qkv": "false"}) if target.lora_graph else fp32
    final = fp32
    if target.precision == "int4":
        q = target.quantization
        options = {"block_size": str(q.block_size), "accuracy_level": str(q.accuracy_level),
                   "is_symmetric": str(q.symmetric).lower()}
        if q.mixed_precision:
            options["matmul_mixed_precision"] = q.mixed_precision
        final = _run(hf, work / f"{stem}.gqa-int4", "int4", options)
    return final, fp32, raw, _spec(final, model.config).to_json()


def _save_hf(model: Any, folder: Path) -> None:
    """The model as the builder reads it: safetensors + config, and the base's tokenizer files (it opens them)."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    src = Path(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or ".")
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, folder / f)
    if not any(f.startswith("tokenizer") for f in copied):
        raise EdgeloraError(f"{src}: the model builder reads the base's tokenizer, and this folder has none "
                            "(tokenizer.json / tokenizer.model); add it, or choose a target with decoder_graph = "
                            "'trace'")


def _run(hf: Path, out: Path, precision: str, options: dict[str, str]) -> Path:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    extra = [f"{k}={v}" for k, v in {"hf_token": "false", **options}.items()]
    cmd += ["--extra_options", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    graph = out / "model.onnx"
    if done.returncode != 0 or not graph.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise EdgeloraError(f"ONNX Runtime GenAI's model builder failed on {hf} ({precision}): "
                            f"{lines[-1] if lines else 'no output'}")
    data = out / "model.onnx.data"
    if data.is_file() and data.stat().st_size < INLINE_LIMIT:
        # one self-contained file, as the traced exporter writes: a re-exported task engine is copied beside the
        # base engine, where a separate data file of the same name would be the base's
        import onnx

        onnx.save(onnx.load(str(graph)), str(graph))
        data.unlink()
    return graph


def _spec(graph: Path, config: Any) -> OnnxGraphSpec:
    """The builder graph's io, checked to be the interface the runtime feeds: ids, mask, the cache; logits, cache."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    inputs = tuple(i.name for i in proto.graph.input)
    outputs = tuple(o.name for o in proto.graph.output)
    layers, kv_heads, head_dim = decoder_geometry(config)
    past, present = cache_names(layers)
    if set(inputs) != {"input_ids", "attention_mask", *past} or set(outputs) != {"logits", *present}:
        raise EdgeloraError(f"{graph}: the model builder wrote inputs {list(inputs[:3])}… / outputs "
                            f"{list(outputs[:2])}…, not input_ids, attention_mask, the cache → logits, the cache; "
                            "this family's builder graph is not supported yet, choose decoder_graph = 'trace'")
    return OnnxGraphSpec("causal-lm", ("input_ids", "attention_mask", *past), ("logits", *present), layers, kv_heads,
                         head_dim, {"kv_cache": "shared"})
