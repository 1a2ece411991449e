"""Named model configs: tiny ones built on the fly for tests and demos, real ones for planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# Tiny models for tests and demos. A larger initializer_range than HF's 0.02 gives the frozen
# random lm_head logits of a useful scale, so an adapter alone can visibly fit data.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.2,
)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", {**_TINY, "num_key_value_heads": 2}),
    "tiny-mistral": ("mistral", {**_TINY, "num_key_value_heads": 2}),
    "llama-3.1-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "llama-3.1-70b": (
        "llama",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
    ),
    # google/gemma-3-27b-pt's text_config: 32 x 128 query dims (4096), not the hidden size 5376
    "gemma-3-27b": (
        "gemma3_text",
        dict(
            hidden_size=5376,
            intermediate_size=21504,
            num_hidden_layers=62,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=128,
            vocab_size=262208,
            query_pre_attn_scalar=168,
            sliding_window=1024,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-32b": (
        "qwen3",
        dict(
            hidden_size=5120,
            intermediate_size=25600,
            num_hidden_layers=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
    ),
    # microsoft/Phi-3-medium-4k-instruct: packed qkv_proj and gate_up_proj, head_dim 5120 / 40 = 128
    "phi-3-medium": (
        "phi3",
        dict(
            hidden_size=5120,
            intermediate_size=17920,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=10,
            vocab_size=32064,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
}


# Mixture-of-experts models (transformers 5.x keeps each layer's routed experts as one module of fused
# 3-D tensors, ``mlp.experts``). Qwen/Qwen3-30B-A3B: 48 layers of 128 experts (top 8) of size 768;
# its intermediate_size 6144 would size only dense layers (mlp_only_layers), of which it has none.
MOE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # A tiny Qwen3-MoE for tests and demos (byte vocabulary): 4 experts (top 2) of size 32 per layer.
    "tiny-qwen3-moe": (
        "qwen3_moe",
        {
            **_TINY,
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=151936,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
    ),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts (top 2) of size 14336 in each of 32 layers
    "mixtral-8x7b": (
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        ),
    ),
    # openai/gpt-oss-20b: 32 experts (top 4) of size 2880 with biases, stored transposed; 64 x 64 query
    # dims (4096), not the hidden size 2880; attention sinks and alternating sliding-window layers
    "gpt-oss-20b": (
        "gpt_oss",
        dict(
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            vocab_size=201088,
            sliding_window=128,
            tie_word_embeddings=False,
        ),
    ),
}
PRESETS.update(MOE_PRESETS)


def llama_config(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    max_positions: int = 2048,
    kv_heads: int | None = None,
    **extra,
):
    """A Llama config of the given sizes (``kv_heads`` None: full attention, as many KV heads as
    heads), for benchmarks and tests; ``extra``: other ``LlamaConfig`` fields."""
    from transformers import LlamaConfig  # noqa: PLC0415

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        **extra,
    )


def save_byte_llama(
    out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_positions: int
) -> Path:
    """A random Llama (seed 0) of these sizes with bdlora's byte-level tokenizer (vocabulary 256,
    eos as bos, untied head), saved to ``out``: a model vLLM serves, for tests and benchmarks."""
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    from bdlora.train.export import hf_byte_tokenizer  # noqa: PLC0415

    tokenizer = hf_byte_tokenizer()
    eos = tokenizer.eos_token_id
    config = llama_config(
        hidden,
        intermediate,
        layers,
        heads,
        len(tokenizer),
        max_positions,
        kv_heads,
        eos_token_id=eos,
        bos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def preset_config(name: str):
    """The transformers config of a preset."""
    from transformers import AutoConfig  # noqa: PLC0415

    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    model_type, kwargs = PRESETS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(name_or_dir: str, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A causal LM from a preset name (random weights, seeded) or a saved model directory.

    ``device="meta"`` builds the structure without allocating weights (for planning big models).
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if Path(name_or_dir).is_dir():
        return AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32)
    config = preset_config(name_or_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
