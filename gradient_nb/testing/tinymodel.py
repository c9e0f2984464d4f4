"""A tiny randomly initialised Llama with a character-level tokenizer, saved as a model folder.

For fast tests and smoke benchmarks of the RL layer: every character is one token, so text-level tasks
(a length target, an ``<answer>`` tag) are within reach of a model that trains in seconds on a CPU,
and the folder loads through the same paths as a real model (``resolve_model``, ``load_shard``,
``load_tokenizer``, serving peers).
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_char_model(path: str | Path, *, hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0,
                    warm_steps: int = 0) -> Path:
    """Write (once) a tiny Llama + char tokenizer to ``path``; returns the folder.

    ``warm_steps`` > 0 first fine-tunes it (supervised, a few seconds) on answers of the shipped
    ``format`` task's shape with random lengths, ``<answer>`` + 1..8 letters + ``</answer>`` + EOS, as
    RL usually starts from an instruction-tuned model: RL then has a length to learn, not a format to
    discover from nothing."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    final = Path(path)
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    # Written aside and renamed into place: concurrent test sessions never see half a folder.
    out = final.with_name(f".{final.name}.{os.getpid()}")
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
    if warm_steps:
        _warm_start(model, fast, warm_steps, seed)
    model.save_pretrained(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(out, final)
    except OSError:  # another process finished first
        shutil.rmtree(out, ignore_errors=True)
    return final


def _warm_start(model: torch.nn.Module, tok: object, steps: int, seed: int) -> None:
    import random

    from ..rl.tasks import FormatTask

    rng = random.Random(seed)
    task = FormatTask()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for _ in range(16):
            prompt = tok.apply_chat_template([{"role": "user", "content": task.prompt(rng).text}],  # type: ignore[attr-defined]
                                             add_generation_prompt=True, tokenize=False)
            answer = "<answer>" + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8)))
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            a_ids = tok(answer + "</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # type: ignore[operator,attr-defined]
            rows.append(p_ids + a_ids)
            masks.append([0] * len(p_ids) + [1] * len(a_ids))
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([[t if m else -100 for t, m in zip(r, mk, strict=True)] + [-100] * (width - len(r))
                               for r, mk in zip(rows, masks, strict=True)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
