"""Tiny random models of every supported architecture (fp32, CPU) for fast exactness tests."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 320


def _common(**kw):
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        eos_token_id=VOCAB - 1,
        bos_token_id=1,
        pad_token_id=0,
    )
    base.update(kw)
    return base


def tiny_config(arch: str):
    if arch == "llama":
        return tf.LlamaConfig(**_common())
    if arch == "mistral":
        return tf.MistralConfig(**_common(sliding_window=None))
    if arch == "qwen2":
        return tf.Qwen2Config(**_common())
    if arch == "qwen3":
        return tf.Qwen3Config(**_common(head_dim=16))
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **_common(num_hidden_layers=4, head_dim=16, sliding_window=24, query_pre_attn_scalar=16),
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # random models tend to repeat one token: sharpen the output so greedy decoding exercises varied tokens
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model
