"""Tiny random models and a byte tokenizer, for fast tests and examples (no hub, no files)."""
from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models and a byte tokenizer, for fast tests (no hub, no files).
# ---------------------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos>. Real tokenization, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_config(arch: str = "llama", *, layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int | None = None, vocab: int = 257, max_pos: int = 512):
    """Config of a tiny random model: arch 'llama' (LLaMA/SmolLM2 family), 'qwen2', 'opt', or the mixture-of-experts
    'mixtral' / 'qwen3_moe' (4 experts, top-2)."""
    from transformers import LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_pos,
                           tie_word_embeddings=True, use_cache=False, bos_token_id=None, eos_token_id=vocab - 1,
                           pad_token_id=vocab - 1)
    if arch == "qwen2":  # Qwen2 family: q/k/v biases, NEOX RoPE
        from transformers import Qwen2Config

        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_pos,
                           tie_word_embeddings=True, use_cache=False, bos_token_id=None, eos_token_id=vocab - 1,
                           pad_token_id=vocab - 1)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_pos, word_embed_proj_dim=hidden,
                         do_layer_norm_before=True, use_cache=False, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                         pad_token_id=vocab - 1, enable_bias=True)
    if arch in ("mixtral", "qwen3_moe"):  # mixture of experts: transformers 5's fused experts, a top-2 router
        from transformers import MixtralConfig, Qwen3MoeConfig

        common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_pos,
                      num_experts_per_tok=2, tie_word_embeddings=False, use_cache=False, bos_token_id=None,
                      eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        if arch == "mixtral":
            return MixtralConfig(num_local_experts=4, **common)
        return Qwen3MoeConfig(num_experts=4, moe_intermediate_size=intermediate // 2, head_dim=hidden // heads,
                              norm_topk_prob=True, **common)
    raise ValueError(f"tiny arch {arch!r}: use llama, qwen2, opt, mixtral or qwen3_moe")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return model
