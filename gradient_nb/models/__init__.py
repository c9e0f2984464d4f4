"""Load a causal LM whole, or only a range of its decoder layers, optionally quantized."""

from .loader import (
    DEFAULT_MODEL,
    ModelInfo,
    ShardModel,
    load_full_model,
    load_shard,
    load_tokenizer,
    model_info,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "ShardModel",
    "load_full_model",
    "load_shard",
    "load_tokenizer",
    "model_info",
    "resolve_model",
]
