"""Tiny seeded models (BERT, GPT-2, LLaMA, Qwen2, OPT, Mistral) built from configs, for tests and examples.

Each is saved as a complete HF folder (config, safetensors weights, a character-level tokenizer),
so every code path that takes ``--base FOLDER`` runs on it in milliseconds. Same seed, same bytes.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

FAMILIES = ("bert", "gpt2", "llama", "qwen2", "opt", "mistral")
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
VOCAB_SIZE = 128  # specials + printable ASCII, padded


def char_tokenizer(family: str) -> Any:
    """A character-level fast tokenizer: BERT-style ``[CLS] x [SEP]`` for encoders, ``x`` for decoders."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase() if family == "bert" else normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        specials = {"eos_token": "</s>", "bos_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **specials)


def tiny_config(family: str) -> Any:
    import transformers as tf

    common = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0}
    if family == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=128, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=5, eos_token_id=5,
                             **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=5, eos_token_id=5,
                              tie_word_embeddings=False, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=5, eos_token_id=5,
                              tie_word_embeddings=True, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=5, eos_token_id=5,
                            **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, sliding_window=None,
                                bos_token_id=5, eos_token_id=5, tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny family {family!r}; use one of {FAMILIES}")


def make_tiny(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny seeded ``family`` model folder: BertModel for BERT, *ForCausalLM for decoders."""
    import torch
    import transformers as tf

    from .base import quiet_transformers

    quiet_transformers()
    config = tiny_config(family)
    cls = tf.BertModel if family == "bert" else tf.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = cls(config) if family == "bert" else cls.from_config(config)
    # Default init (std 0.02) makes LoRA deltas tiny next to W0; wider weights make parity tests sharper.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    char_tokenizer(family).save_pretrained(str(folder))
    return folder
