"""The reference workloads of ../shared/DESIGN.md, built locally (no hub access).

W1: the bundled all-MiniLM-L6-v2 with the example adapters (examples/adapters/sst2, agnews).
W2: the SmolLM2-135M architecture (LLaMA-style: hidden 576, 30 layers, 9 heads, 3 KV heads,
    intermediate 1536, vocab 49152, tied embeddings) with seeded random weights, and LoRA adapters
    r = 16 on q_proj, k_proj, v_proj, o_proj made by the real peft library (random, non-zero B).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
W1_ADAPTERS = {"sst2": REPO / "examples/adapters/sst2", "agnews": REPO / "examples/adapters/agnews"}


def w2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)


def make_w2_base(folder: Path, seed: int = 0) -> Path:
    """Seeded SmolLM2-135M-shaped LLaMA (default init, std 0.02); written once, reused after."""
    import torch
    from transformers import LlamaForCausalLM

    from edgelora.tiny import char_tokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = LlamaForCausalLM(w2_config())
    model.save_pretrained(str(folder), safe_serialization=True)
    char_tokenizer("llama").save_pretrained(str(folder))
    return folder


def make_w2_adapter(base: Path, folder: Path, seed: int) -> Path:
    """LoRA r=16, alpha=32 on q,k,v,o of every layer, A and B random (as if trained)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # a trained-looking ΔW: the size of a few percent of W0
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(folder))
    return folder
