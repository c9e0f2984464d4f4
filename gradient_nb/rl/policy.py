"""The policy being trained: the base model plus a LoRA adapter (peft), and its log-probabilities.

Only the adapter trains (the base stays frozen), so a new policy version is a few hundred kB to a few
MB of LoRA matrices instead of the whole model: that is what the weight sync moves to the samplers,
which merge it into the layers they serve (``gradient_nb.models.adapter``). The adapter is saved in
peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), so a trained adapter is
served again with ``gradient-nb serve --adapter PATH`` or loaded by peft itself.

``token_logprobs`` is the trainer's view of a rollout: one teacher-forced pass over prompt + completion,
the log-probability of each completion token at the sampling temperature, in float32. It is what the
GRPO ratio and the sampler/trainer mismatch are computed from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, adapter_from_bytes
from ..models.loader import load_full_model, load_tokenizer, resolve_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Policy:
    """Base model + trainable LoRA adapter. ``version`` counts the optimizer steps published."""

    def __init__(self, model: str | Path, *, r: int = 8, lora_alpha: float = 16.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        self.path = resolve_model(model)
        self.tokenizer = load_tokenizer(self.path)
        torch.manual_seed(seed)  # the adapter's A matrices are initialised at random (B at zero)
        base = load_full_model(self.path, dtype=torch.float32)
        base.requires_grad_(False)
        self.config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, self.config)
        self.version = 0

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- the adapter as data --------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().to(torch.float32).contiguous().clone()
                for k, v in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter keys this policy does not have: {unexpected[:4]}")

    def adapter_config(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d["base_model_name_or_path"] = str(self.path)
        return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))

    def adapter_bytes(self) -> tuple[bytes, bytes]:
        """(config JSON, safetensors) of the current adapter: what a weight sync moves."""
        from safetensors.torch import save

        return json.dumps(self.adapter_config(), sort_keys=True).encode(), save(self.adapter_state())

    def adapter(self) -> LoraAdapter:
        return adapter_from_bytes(*self.adapter_bytes())

    def save(self, path: str | Path) -> Path:
        """Save the adapter in peft's format (safetensors)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        config, weights = self.adapter_bytes()
        (out / CONFIG_FILE).write_bytes(config)
        (out / WEIGHTS_FILE).write_bytes(weights)
        return out

    # -- log-probabilities ----------------------------------------------------------------------
    def token_logprobs(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per completion token: log-prob [B, T] at ``temperature``, entropy [B, T], mask [B, T].

        Sequences are right-padded into one batch (causal attention never looks right, so padding
        after a sequence does not change its logits). Gradients flow when called outside no_grad.
        """
        rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64)
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
        logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
        t = max(len(c) for c in completions)
        b = len(rows)
        lp = torch.zeros(b, t)
        ent = torch.zeros(b, t)
        mask = torch.zeros(b, t)
        out_lp, out_ent = [], []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            n = len(c)
            if n == 0:
                out_lp.append(lp[i])
                out_ent.append(ent[i])
                continue
            # the logits at position j predict token j + 1
            step = torch.log_softmax(logits[i, len(p) - 1: len(p) - 1 + n] / (temperature or 1.0), dim=-1)
            tok = torch.tensor(list(c), dtype=torch.int64)
            row_lp = step.gather(-1, tok[:, None])[:, 0]
            row_ent = -(step.exp() * step).sum(-1)
            out_lp.append(torch.cat([row_lp, torch.zeros(t - n)]))
            out_ent.append(torch.cat([row_ent.detach(), torch.zeros(t - n)]))
            mask[i, :n] = 1.0
        return torch.stack(out_lp), torch.stack(out_ent), mask
