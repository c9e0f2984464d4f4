"""A tiny randomly initialised Llama with a character-level tokenizer, saved as a model folder.

For fast tests and smoke benchmarks of the RL layer: every character is one token, so text-level tasks
(a length target, an ``<answer>`` tag) are within reach of a model that trains in seconds on a CPU,
and the folder loads through the same paths as a real model (``resolve_model``, ``load_shard``,
``load_tokenizer``, serving peers).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_char_model(path: str | Path, *, hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0) -> Path:
    """Write (once) a tiny Llama + char tokenizer to ``path``; returns the folder."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}>{% endif %}")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = vocab["</s>"]
    model.save_pretrained(out)
    return out
