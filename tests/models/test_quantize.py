"""int8 / nf4 shards (bitsandbytes, on CPU here): top-1 agreement with fp32 under teacher forcing.

Measured on this machine (2026-11, SmolLM2-135M dequantised from Q4_1, 368 teacher-forced positions of a
chat transcript, three quantized stages): int8 0.924, nf4 0.717 (the weights were 4-bit once already;
nf4 re-quantises them on another grid). The floors below sit a little under those figures.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradient_nb.models import load_shard, load_tokenizer, model_info, resolve_model
from gradient_nb.models.quantize import quantize_linears
from gradient_nb.serve.shard import ShardRuntime

FLOORS = {"int8": 0.88, "nf4": 0.65}

TRANSCRIPT = [
    {"role": "user", "content": "I want to start growing vegetables on my balcony. Where do I begin?"},
    {"role": "assistant", "content": (
        "Start small. Check how many hours of direct sun your balcony gets: tomatoes and peppers need six "
        "or more, while lettuce, spinach and herbs such as parsley and mint are happy with four. Use "
        "containers with drainage holes, at least twenty litres for tomatoes, and a good peat-free potting "
        "mix rather than garden soil, which compacts in pots. Water in the morning, deeply, when the top "
        "few centimetres of soil are dry, and feed fruiting plants every two weeks once they flower.")},
    {"role": "user", "content": "Which vegetables are the easiest for a complete beginner?"},
    {"role": "assistant", "content": (
        "Radishes are ready in about four weeks and forgive almost everything. Loose-leaf lettuce can be "
        "cut again and again. Bush beans need no support and produce for weeks. Cherry tomatoes are more "
        "work but very rewarding; choose a compact variety for pots. Herbs like basil, chives and thyme "
        "are also easy and you will use them every day in the kitchen. Avoid large plants like pumpkins "
        "or sweet corn at first: they need more space and water than a balcony usually offers.")},
    {"role": "user", "content": "How do I keep pests away without chemicals?"},
    {"role": "assistant", "content": (
        "Look at your plants every few days, especially under the leaves. Aphids can be washed off with a "
        "strong jet of water or wiped away by hand. Planting marigolds and nasturtiums nearby attracts "
        "ladybirds and hoverflies, whose larvae eat aphids. Slugs are rarer on balconies, but a copper tape "
        "around pots keeps them out. Healthy, well-watered plants resist pests far better than stressed ones.")},
]


@pytest.fixture(scope="module")
def teacher_forced():
    path = resolve_model()
    tok = load_tokenizer(path)
    enc = tok.apply_chat_template(TRANSCRIPT)
    ids = torch.tensor(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    ref = load_shard(path, 0, 30).forward(ids).argmax(-1)
    return path, ids, ref


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_top1_agreement(teacher_forced, kind: str) -> None:
    path, ids, ref = teacher_forced
    assert ids.shape[0] > 300
    # Quantized as three stages, the way a mesh would hold it.
    x = ids
    stages = [load_shard(path, a, b, quantization=kind) for a, b in [(0, 10), (10, 20), (20, 30)]]
    for s in stages:
        x = s.forward(x)
    agree = float((x.argmax(-1) == ref).float().mean())
    print(json.dumps({"quantization": kind, "positions": ids.shape[0], "top1_agreement": round(agree, 4)}))
    assert agree >= FLOORS[kind], f"{kind}: top-1 agreement {agree:.3f} under the floor {FLOORS[kind]}"
    info = model_info(path)
    fp32_layers = sum(info.layer_bytes[0:10])
    quant_layers = sum(p.numel() * p.element_size() for p in stages[0].layers.parameters())
    assert quant_layers < fp32_layers / (3.5 if kind == "int8" else 7)


@pytest.mark.slow
async def test_quantized_shard_serves_through_the_runtime(teacher_forced) -> None:
    path, ids, _ = teacher_forced
    rt = ShardRuntime(load_shard(path, 0, 30, quantization="int8"))
    logits = await rt.forward("q", range(40), ids[:40])
    assert logits.shape == (49152,) and torch.isfinite(logits).all()
    nxt = await rt.forward("q", [40], ids[40:41])
    assert torch.isfinite(nxt).all()
    await rt.aclose()


def test_quantize_linears_replaces_every_linear() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Sequential(nn.Linear(128, 64, bias=False)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = m(x)
    assert quantize_linears(m, "int8") == 2
    assert not any(type(mod) is nn.Linear for mod in m.modules())
    with torch.no_grad():
        out = m(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
