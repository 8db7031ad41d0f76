"""Tiny random Llamas for tests: deterministic weights, a few layers, grouped-query attention.

`save_tiny_llama` writes a complete HF directory (config, safetensors, a byte-level tokenizer with a
chat template), so tests exercise the same loading path as a user's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# A few English merges (byte-level alphabet: "Ġ" is a space) for a GPT-2-style tokenizer.
GPT2_MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "r"))


def byte_tokenizer(merges: Sequence[tuple[str, str]] = ()) -> Any:
    """A byte-level BPE tokenizer: 256 byte tokens, one token per merge, then BOS/EOS/PAD (259 ids without merges).

    Without merges, text is not split (every byte is a token anyway). With merges it is a GPT-2-style BPE,
    split with GPT-2's regex, as llama.cpp's `gpt2` tokenizer (which needs at least one merge) expects.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for tok in (BOS, EOS, PAD):
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(merges))
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS, EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE)


def tiny_llama(seed: int = 0, *, hidden_size: int = 64, num_hidden_layers: int = 2,
               num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
               vocab_size: int = 259, max_position_embeddings: int = 2048,
               tie_word_embeddings: bool = True, rope_theta: float = 10000.0,
               rope_scaling: dict[str, Any] | None = None) -> Any:
    """A deterministic random LlamaForCausalLM (fp32, eval mode). Same seed and dims, same weights.
    `rope_scaling`: RoPE scaling parameters (rope_type, factor, ...) besides rope_theta; None: default RoPE."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}, bos_token_id=vocab_size - 3,
        eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))  # peaked, stable next-token choices
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def save_tiny_llama(path: Path | str, seed: int = 0, merges: Sequence[tuple[str, str]] = (), **dims: Any) -> Path:
    """Write a tiny Llama as a complete HF directory and return its path (vocab sized to the tokenizer)."""
    path = Path(path)
    model = tiny_llama(seed, **{"vocab_size": 259 + len(merges), **dims})
    model.save_pretrained(path)
    byte_tokenizer(merges).save_pretrained(path)
    return path
