"""LoRA adapters (peft's on-disk format) merged into the decoder layers a shard holds.

A LoRA adapter adds ``scale · B @ A`` to some Linear weights (``scale = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). peft saves it as ``adapter_config.json`` plus
``adapter_model.safetensors`` whose keys name the module they patch, e.g.
``base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight``. A shard of layers [start, end)
only reads the keys of its own layers (a stage loads only its layers' adapter weights).

The delta is merged into the weights rather than run as side matrices: the serving path, the batched
shard runtime and the verifier's recomputation then see one ordinary model and need no LoRA code.
``AdapterMerge`` keeps a copy of every base weight it touched, so a new adapter version is applied by
restoring the base and merging the new delta (never by subtracting the old one, which would accumulate
rounding over many versions); ``clear()`` returns exactly the base weights.

Adapter bytes may come from the network (the RL layer's weight sync), so parsing treats them as
hostile: safetensors only (``safetensors.torch.load`` of bytes executes nothing), every key must name a
``lora_A``/``lora_B`` weight of a Linear in a decoder layer, shapes must match that Linear and the rank,
and the config's fields are type-checked. Quantized shards are refused: merging needs float weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 1024
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.([A-Za-z0-9_.]+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be applied: malformed, or not made for this model."""


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter: per (layer, module path inside the layer) its A [r, in] and B [out, r]."""

    r: int
    scale: float
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def layers(self) -> set[int]:
        return {layer for layer, _ in self.weights}

    def delta(self, layer: int, module: str) -> torch.Tensor:
        a, b = self.weights[(layer, module)]
        return (b.float() @ a.float()) * self.scale


def parse_config(config: Any) -> tuple[int, float, tuple[str, ...]]:
    """(r, scale, target_modules) of a peft LoRA config dict, checked."""
    if not isinstance(config, dict):
        raise AdapterError("the adapter config is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, not {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported (only plain LoRA merges into the weights)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= MAX_RANK:
        raise AdapterError(f"the adapter's rank r must be an integer in 1..{MAX_RANK}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError("the adapter's lora_alpha must be a finite number")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError("target_modules must be a list of module names")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, float(scale), tuple(targets)


def parse_adapter(config: Any, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    """An adapter from its config dict and its safetensors tensors (peft's key names), checked."""
    r, scale, targets = parse_config(config)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r} in the adapter (only decoder layers' lora_A/lora_B)")
        if not t.is_floating_point() or t.dim() != 2 or not torch.isfinite(t).all():
            raise AdapterError(f"{key}: a LoRA matrix is a finite 2-d float tensor")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    weights = {}
    for (layer, module), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: needs both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"layer {layer} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank {r}")
        weights[(layer, module)] = (a, b)
    return LoraAdapter(r, scale, targets, weights)


def adapter_from_bytes(config_json: bytes | str, safetensors_bytes: bytes) -> LoraAdapter:
    """Parse an adapter received as bytes (safetensors only: nothing in them is executed)."""
    from safetensors.torch import load

    try:
        config = json.loads(config_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"the adapter config is not valid JSON: {exc}") from None
    try:
        tensors = load(bytes(safetensors_bytes))
    except Exception as exc:  # safetensors raises its own SafetensorError on any malformed header
        raise AdapterError(f"the adapter weights are not a valid safetensors file: {exc}") from None
    return parse_adapter(config, tensors)


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    p = Path(path).expanduser()
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{p} is not a LoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return adapter_from_bytes((p / CONFIG_FILE).read_bytes(), (p / WEIGHTS_FILE).read_bytes())


class AdapterMerge:
    """Merges LoRA adapters into the decoder layers of one shard (``layers[i]`` is global layer
    ``start + i``), keeping the base weights it touched so each new version starts from the base."""

    def __init__(self, layers: nn.ModuleList, start: int) -> None:
        self.layers = layers
        self.start = start
        self._base: dict[tuple[int, str], torch.Tensor] = {}

    def _linear(self, layer: int, module: str) -> nn.Linear:
        try:
            lin = self.layers[layer - self.start].get_submodule(module)
        except AttributeError:
            raise AdapterError(f"layer {layer} has no module {module!r}") from None
        if not isinstance(lin, nn.Linear) or not lin.weight.is_floating_point():
            raise AdapterError(f"layer {layer} {module} is not a float Linear (quantized shards cannot merge)")
        return lin

    def apply(self, adapter: LoraAdapter | None) -> int:
        """Serve ``adapter`` (None: the base model); returns how many of this shard's weights it patched.
        Every matrix is checked before any weight changes, so a bad adapter leaves the shard as it was."""
        end = self.start + len(self.layers)
        mine = {} if adapter is None else {k: v for k, v in adapter.weights.items() if self.start <= k[0] < end}
        for (layer, module), (a, b) in mine.items():
            w = self._linear(layer, module).weight
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise AdapterError(f"layer {layer} {module}: the adapter's delta is {b.shape[0]}x{a.shape[1]}, "
                                   f"the weight is {tuple(w.shape)} (an adapter for another model?)")
        with torch.no_grad():
            self.clear()
            for (layer, module) in mine:
                w = self._linear(layer, module).weight
                self._base[(layer, module)] = w.detach().clone()
                w.add_(adapter.delta(layer, module).to(w.dtype))  # type: ignore[union-attr]
        return len(mine)

    def clear(self) -> None:
        """Restore the base weights."""
        with torch.no_grad():
            for (layer, module), base in self._base.items():
                self._linear(layer, module).weight.copy_(base)
        self._base.clear()
