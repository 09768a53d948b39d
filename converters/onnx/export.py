"""torch -> ONNX: encoders (backbone, sequence classification) and decoders (causal LM with KV cache).

Why not optimum-onnx's exporters: its only release (0.1.0) pins ``transformers<4.58`` and edgelora
runs on transformers 5 (and peft built for it), so installing it would downgrade the stack under
every other command. The graphs it would give are plain ``torch.onnx`` traces of the same modules;
the wrappers below are those traces, written out for the families we test (BERT/MiniLM, GPT-2,
LLaMA, Qwen2), with the cache as explicit ``past_key_values.{i}.key/value`` inputs and
``present.{i}.key/value`` outputs (optimum's names), so on-device generation is incremental.

API (the same shape in every converter): ``export_<kind>(model, path, opset) -> OnnxGraphSpec``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Inputs of an encoder graph. token_type_ids is left out: every target family uses segment 0.
ENCODER_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class OnnxGraphSpec:
    """What a caller (and the runtime) needs to feed and read an exported graph."""

    kind: str  # "encoder" | "sequence-classification" | "causal-lm"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                **self.extra}


class _ClassicBert(torch.nn.Module):
    """BERT's forward pass written as the classic BertSelfAttention code (transformers 4.x).

    transformers 5 builds the attention mask with ``Where``/``IsNaN`` guards and reshapes heads with
    ``-1``: correct, but ONNX Runtime's transformer optimizer recognises neither, so no ``Attention``
    or ``EmbedLayerNormalization`` fusion happens and int8 cannot use ``QAttention``. This trace uses
    the same modules (so the same weights and the same name map) with the additive ``-10000`` mask
    and explicit head reshapes the optimizer was built for. Every engine is verified against the
    transformers forward pass, so a mismatch cannot go unnoticed.
    """

    def __init__(self, model: torch.nn.Module, head: bool) -> None:
        super().__init__()
        self.model = model
        self.bert = model.base_model
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import math

        hidden = self.bert.embeddings(input_ids=input_ids)
        additive = (1.0 - attention_mask.unsqueeze(1).unsqueeze(2).to(torch.float32)) * -10000.0
        for layer in self.bert.encoder.layer:
            sa = layer.attention.self
            heads, head_dim = sa.num_attention_heads, sa.attention_head_size

            def split(x: torch.Tensor, heads: int = heads, head_dim: int = head_dim) -> torch.Tensor:
                return x.view(x.size()[:-1] + (heads, head_dim)).permute(0, 2, 1, 3)

            q, k, v = split(sa.query(hidden)), split(sa.key(hidden)), split(sa.value(hidden))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
            context = torch.matmul(torch.softmax(scores + additive, dim=-1), v).permute(0, 2, 1, 3).contiguous()
            context = context.view(context.size()[:-2] + (heads * head_dim,))
            attended = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attended), attended)
        if self.head and _mean_pooling(self.model):  # edgelora.modeling_edgelora's head: the masked mean
            return self.model.classifier(self.model.pool(hidden, attention_mask))
        pooled = self.bert.pooler(hidden) if self.bert.pooler is not None else None
        if self.head:
            return self.model.classifier(pooled)
        return (hidden, pooled) if pooled is not None else (hidden,)


def _mean_pooling(model: torch.nn.Module) -> bool:
    """Whether the model's classifier reads the mean of the token states (``edgelora.modeling_edgelora``)."""
    return getattr(model, "pooling", "cls") == "mean"


def _classic_bert_applies(model: torch.nn.Module, head: bool) -> bool:
    """The classic trace covers plain BERT (MiniLM): absolute positions, a pooler and a linear head."""
    cfg = model.config
    return (getattr(cfg, "model_type", "") == "bert"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and not getattr(cfg, "is_decoder", False)
            and (not head or (model.base_model.pooler is not None
                              and isinstance(getattr(model, "classifier", None), torch.nn.Linear))))


class _Backbone(torch.nn.Module):
    """Encoder without a task head: hidden states and (where the model has one) the pooled output."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "pooler_output", None) is not None:
            return out.last_hidden_state, out.pooler_output
        return (out.last_hidden_state,)


class _Classifier(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def decoder_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder config (GPT-2 and LLaMA-style names)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv, head_dim


class _CausalLMWithCache(torch.nn.Module):
    """Causal LM with the KV cache as flat tensors: (ids, mask, past...) -> (logits, present...)."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        past_len = past[0].shape[2]
        # Positions follow the cache (left-aligned batches: every row has the same past length).
        positions = (torch.arange(input_ids.shape[1]) + past_len).unsqueeze(0).expand(input_ids.shape[0], -1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         position_ids=positions, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        # The TorchScript exporter: the dynamo one does not yet take transformers' cache objects.
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=min(opset, 20), dynamo=False,
                          do_constant_folding=True)
    if opset > 20:  # the TorchScript exporter stops at 20; int4 needs the ai.onnx domain at 21
        import onnx

        model = onnx.load(str(path))
        model = onnx.version_converter.convert_version(model, opset)
        onnx.save(model, str(path))


def _example_ids(model: torch.nn.Module, batch: int, seq: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def export_encoder(model: torch.nn.Module, path: Path, opset: int) -> OnnxGraphSpec:
    """The headless encoder (``model.base_model``): last_hidden_state (+ pooler_output)."""
    wrapper = _ClassicBert(model, head=False) if _classic_bert_applies(model, False) else _Backbone(model.base_model)
    ids = _example_ids(model, 2, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        n_out = len(wrapper(ids, mask))
    outputs = ["last_hidden_state", "pooler_output"][:n_out]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}}
    _export(wrapper, (ids, mask), path, list(ENCODER_INPUTS), outputs,
            {k: v for k, v in axes.items() if k in (*ENCODER_INPUTS, *outputs)}, opset)
    return OnnxGraphSpec("encoder", ENCODER_INPUTS, tuple(outputs))


def export_sequence_classification(model: torch.nn.Module, path: Path, opset: int) -> OnnxGraphSpec:
    ids = _example_ids(model, 2, 8)
    wrapper = _ClassicBert(model, head=True) if _classic_bert_applies(model, True) else _Classifier(model)
    _export(wrapper, (ids, torch.ones_like(ids)), path, list(ENCODER_INPUTS), ["logits"],
            {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
             "logits": {0: "batch"}}, opset)
    return OnnxGraphSpec("sequence-classification", ENCODER_INPUTS, ("logits",))


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past inputs, present outputs) of a decoder graph with ``layers`` layers, in the order engines list them."""
    return ([f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")],
            [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")])


def export_causal_lm(model: torch.nn.Module, path: Path, opset: int) -> OnnxGraphSpec:
    layers, kv_heads, head_dim = decoder_geometry(model.config)
    past_names, present_names = cache_names(layers)
    ids = _example_ids(model, 1, 2)
    past = [torch.randn(1, kv_heads, 3, head_dim, generator=torch.Generator().manual_seed(i))
            for i in range(2 * layers)]
    mask = torch.ones(1, 5, dtype=torch.long)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "attention_mask": {0: "batch", 1: "total_sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    axes |= {n: {0: "batch", 2: "past_sequence"} for n in past_names}
    axes |= {n: {0: "batch", 2: "total_sequence"} for n in present_names}
    _export(_CausalLMWithCache(model, layers), (ids, mask, *past), path, ["input_ids", "attention_mask",
                                                                          *past_names],
            ["logits", *present_names], axes, opset)
    return OnnxGraphSpec("causal-lm", ("input_ids", "attention_mask", *past_names), ("logits", *present_names),
                         layers, kv_heads, head_dim)


def export_for_task(model: torch.nn.Module, task: str, path: Path, opset: int, headless: bool = False
                    ) -> OnnxGraphSpec:
    """Dispatch on the edgelora task name. ``headless``: the encoder without its classifier."""
    if task == "causal-lm":
        return export_causal_lm(model, path, opset)
    if task == "sequence-classification" and not headless:
        return export_sequence_classification(model, path, opset)
    if task in ("sequence-classification", "feature-extraction"):
        return export_encoder(model, path, opset)
    from edgelora.errors import EdgeloraError

    raise EdgeloraError(f"export of task {task!r} is not supported yet; supported: sequence-classification, "
                        "feature-extraction, causal-lm")
