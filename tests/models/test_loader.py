"""Model loading: tiny random models of each family, shard memory, the cached default model."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from gradient_nb.models import load_full_model, load_shard, model_info, resolve_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tiny(kind: str, **extra) -> object:
    if kind == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=True, **extra)
    if kind == "qwen2":  # q/k/v biases, untied head
        return Qwen2Config(**TINY, tie_word_embeddings=False, **extra)
    return MistralConfig(**{**TINY, "tie_word_embeddings": False, "sliding_window": None, **extra})


def save_tiny(tmp: Path, kind: str, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny(kind, **extra), dtype=torch.float32)
    # Random init leaves tiny logits; scale the weights up so that argmax differences would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    out = tmp / kind
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("qwen2", {}), ("mistral", {}),
                                        ("mistral", {"sliding_window": 5}),
                                        ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                                   "max_window_layers": 2})])
def test_shards_chained_equal_the_full_model(tmp_path: Path, kind: str, extra: dict) -> None:
    path = save_tiny(tmp_path, kind, **extra)
    full = load_full_model(path)
    ids = torch.randint(0, TINY["vocab_size"], (17,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = full(ids[None]).logits[0]
    for cuts in [(0, 5), (0, 2, 5), (0, 1, 4, 5)]:
        x = ids
        for a, b in itertools.pairwise(cuts):
            x = load_shard(path, a, b).forward(x)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5, msg=f"{kind} cuts {cuts}")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_shard_holds_only_its_layers(tmp_path: Path, kind: str) -> None:
    path = save_tiny(tmp_path, kind)
    info = model_info(path)
    assert info.family == kind and info.num_layers == 5
    whole = load_shard(path, 0, 5)
    assert whole.parameter_bytes() == info.shard_bytes(0, 5)
    for a, b in [(0, 1), (1, 3), (4, 5), (2, 5)]:
        s = load_shard(path, a, b)
        assert len(s.layers) == b - a
        assert (s.embed_tokens is not None) == (a == 0)
        assert (s.lm_head is not None) == (b == 5)
        assert s.parameter_bytes() == info.shard_bytes(a, b), (a, b)
        assert s.parameter_bytes() < whole.parameter_bytes()
        assert [layer.self_attn.layer_idx for layer in s.layers] == list(range(a, b))


def test_bad_ranges_and_quantization_are_refused(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, "llama")
    for a, b in [(0, 0), (3, 2), (-1, 2), (0, 6)]:
        with pytest.raises(ValueError):
            load_shard(path, a, b)
    with pytest.raises(ValueError):
        load_shard(path, 0, 2, quantization="int3")


def test_resolve_model_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_tiny(tmp_path, "qwen2")
    assert resolve_model(str(path)) == path.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        resolve_model("no-such-model-name")
    # A name cached under $GRADIENT_NB_HOME/models resolves without a path.
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(path)
    monkeypatch.setenv("GRADIENT_NB_HOME", str(home))
    assert resolve_model("tiny") == home / "models" / "tiny"


def test_resolve_model_from_the_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id present in the HF cache resolves offline to its snapshot; an absent one is refused."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    save_tiny(repo / "snapshots", "llama")
    (repo / "snapshots" / "llama").rename(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny-org/tiny-llama") == repo / "snapshots" / "0123abcd"
    with pytest.raises(FileNotFoundError):
        resolve_model("tiny-org/absent")


# ---------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def real_info():
    return model_info(resolve_model())


def test_default_model_info(real_info) -> None:
    info = real_info
    assert (info.family, info.num_layers, info.hidden_size, info.vocab_size) == ("llama", 30, 576, 49152)
    assert info.tie_word_embeddings and info.dtype == "F32"
    assert len(set(info.layer_bytes)) == 1  # identical layers
    assert len(info.content_hash) == 64
    params = 134_515_008  # SmolLM2-135M: 134.5 M parameters, tied head counted once
    assert sum(info.layer_bytes) + info.head_bytes == params * 4  # head = tied embedding + final norm


def test_real_shard_memory_grows_with_the_shard(real_info) -> None:
    path = real_info.path
    small = load_shard(path, 10, 12)
    big = load_shard(path, 10, 20)
    assert small.parameter_bytes() == sum(real_info.layer_bytes[10:12])
    assert big.parameter_bytes() == 5 * small.parameter_bytes()
    full = sum(t.numel() * t.element_size() for t in load_full_model(path).parameters())
    assert big.parameter_bytes() < full / 2


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path: Path) -> None:
    """Two processes resolve the default model into an empty cache at once: both get one good folder."""
    script = textwrap.dedent("""
        import sys
        from gradient_nb.models import resolve_model, model_info
        p = resolve_model()
        print(p, model_info(p).content_hash)
    """)
    env = {**os.environ, "GRADIENT_NB_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip().splitlines()[-1])
    assert outs[0] == outs[1]
    models = tmp_path / "models"
    assert [d.name for d in models.iterdir() if d.is_dir()] == ["smollm2-135m-instruct"]  # no temp leftovers
    assert outs[0].split()[1] == model_info(resolve_model()).content_hash  # same bytes as the main cache
