"""Replace the nn.Linear layers of a shard's decoder layers by bitsandbytes int8 / nf4 layers.

Only the decoder layers are quantized; the embedding, final norm and lm_head stay in the shard dtype
(as transformers' own bitsandbytes integration does by default), because the head's errors go straight
into the logits. bitsandbytes quantizes a weight when it is moved to a device, CPU included.
"""

from __future__ import annotations

import logging

import torch
from torch import nn


class _OnceFilter(logging.Filter):
    """bitsandbytes logs a warning on EVERY int8 matmul fed float32 (it computes in float16 by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("MatMul8bitLt: inputs will be cast"):
            return True
        first, self.seen = not self.seen, True
        return first


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OnceFilter())


def _quantized(lin: nn.Linear, kind: str, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    import bitsandbytes as bnb

    w = lin.weight.data.to("cpu", torch.float16 if kind == "int8" else dtype)
    has_bias = lin.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif kind == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    return q.to(device)  # the move is what quantizes


def quantize_linears(module: nn.Module, kind: str, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> int:
    """Swap every nn.Linear below ``module`` in place; returns how many were swapped."""
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _quantized(lin, kind, dtype, device))
    return len(targets)
