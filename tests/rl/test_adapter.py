"""LoRA adapters: saved as safetensors, merged into a shard's own layers, equal to peft's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradient_nb.models.adapter import AdapterError, AdapterMerge, adapter_from_bytes, load_adapter
from gradient_nb.models.loader import load_shard
from gradient_nb.rl.policy import Policy


def _trained(tiny: Path) -> Policy:
    pol = Policy(tiny, r=4, lora_alpha=8, seed=1)
    with torch.no_grad():  # B starts at zero (adapter = base); give it a real delta
        for name, p in pol.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return pol


def test_pipeline_of_merged_shards_equals_the_peft_model(tiny: Path, tmp_path: Path) -> None:
    pol = _trained(tiny)
    saved = pol.save(tmp_path / "adapter")
    adapter = load_adapter(saved)
    ids = torch.tensor(pol.tokenizer("2+3=<answer>5</answer>")["input_ids"])
    with torch.no_grad():
        want = pol.model(input_ids=ids[None]).logits[0].float()
    a, b = load_shard(tiny, 0, 2), load_shard(tiny, 2, 4)
    base = b(a(ids))
    # each stage reads only its own layers' matrices
    assert AdapterMerge(a.layers, 0).apply(adapter) == 8 and AdapterMerge(b.layers, 2).apply(adapter) == 8
    got = b(a(ids))
    assert (got - want).abs().max() < 1e-5
    assert (base - want).abs().max() > 1e-3  # the adapter does change the model


def test_new_version_re_merges_from_the_base_and_clear_restores_it(tiny: Path) -> None:
    shard = load_shard(tiny, 0, 4)
    before = {k: v.clone() for k, v in shard.state_dict().items()}
    merge = AdapterMerge(shard.layers, 0)
    for _ in range(3):
        merge.apply(_trained(tiny).adapter())
    merge.clear()
    assert all(torch.equal(before[k], v) for k, v in shard.state_dict().items())


def test_bad_adapters_are_refused_and_leave_the_shard_untouched(tiny: Path) -> None:
    pol = _trained(tiny)
    config, weights = pol.adapter_bytes()
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        adapter_from_bytes(config, weights[: len(weights) // 2])
    with pytest.raises(AdapterError, match="not valid JSON"):
        adapter_from_bytes(b"{", weights)
    from safetensors.torch import save

    state = pol.adapter_state()
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(4, 7)  # wrong input width for this model
    shard = load_shard(tiny, 0, 4)
    before = {k: v.clone() for k, v in shard.state_dict().items()}
    with pytest.raises(AdapterError, match="another model"):
        AdapterMerge(shard.layers, 0).apply(adapter_from_bytes(config, save(state)))
    assert all(torch.equal(before[k], v) for k, v in shard.state_dict().items())
    with pytest.raises(AdapterError, match="unexpected tensor"):
        adapter_from_bytes(config, save({"lm_head.weight": torch.zeros(2, 2)}))
