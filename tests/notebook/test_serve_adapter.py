"""``%%parallax serve`` with ``adapter: PATH``, through the notebook session: a LoRA adapter trained and saved
by Echo (two co-located GRPO steps on the tiny model) is merged by each serving peer into the layers it
serves (the kernel layers 0:2, a spawned ``gradient-nb peer --serve --adapter`` process 2:4), and the served
greedy tokens and log-probs equal peft's own model loaded from the same folder (and differ from the base).
Serving the base, the kernel routes around the adapter's peer. A missing folder, a broken file or an
adapter for another model is refused with one line, before the running serve is touched.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError

from gradient_nb.models.loader import load_tokenizer
from gradient_nb.notebook.magics import parse_serve_config
from gradient_nb.notebook.session import BadServeConfig, NotebookSession
from gradient_nb.rl.policy import Policy
from gradient_nb.rl.sampler import AdapterGuard
from gradient_nb.rl.trainer import EchoConfig, EchoRun
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.testing.tinymodel import tiny_char_model

PROMPT = "Say 4 letters in <answer> tags: "
TOKENS = 12


def _peft_greedy(model_dir: Path, adapter: Path | None, ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from plain transformers (+ peft's own loading of the adapter)."""
    from peft import PeftModel

    from gradient_nb.models.loader import load_full_model

    model = load_full_model(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    seq, toks, lps = list(ids), [], []
    with torch.no_grad():
        for _ in range(TOKENS):
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            seq.append(t)
    return toks, lps


async def _served(s: NotebookSession, ids: list[int]) -> tuple[list[int], list[float]]:
    engine = await s.wait_route(wait=120)
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS)
    eos, engine.eos_ids = engine.eos_ids, set()  # the whole TOKENS, as the reference loop does
    try:
        steps = [st async for st in engine.generate_steps(ids, params)]
    finally:
        engine.eos_ids = eos
    return [st.token for st in steps], [st.logprob for st in steps]


def test_the_adapter_key_is_parsed_and_a_bad_one_refused(tmp_path: Path, ipython) -> None:
    from gradient_nb.notebook.magics import GradientMagics

    assert parse_serve_config("adapter: ~/my-adapter\nlayers: 0:4")["adapter"] == "~/my-adapter"
    with pytest.raises(UsageError, match="has no value"):
        parse_serve_config("adapter:")
    ip = ipython
    ip.register_magics(GradientMagics)
    with pytest.raises(UsageError, match=r"adapter .*nowhere.*is not a LoRA adapter folder"):
        ip.run_line_magic("mesh", f"spawn 1 --serve default --adapter {tmp_path / 'nowhere'}")
    with pytest.raises(UsageError, match="--adapter needs --serve"):
        ip.run_line_magic("mesh", f"spawn 1 --adapter {tmp_path}")


async def test_serve_a_trained_adapter(tmp_path: Path) -> None:
    tiny = tiny_char_model(tmp_path / "tiny")
    saved = tmp_path / "adapter"
    cfg = EchoConfig(task="format", mode="colocated", model=str(tiny), steps=2, num_generations=4, max_tokens=8,
                     learning_rate=0.05, lr_scheduler_type="constant", lora_rank=4, save=str(saved))
    state = await EchoRun(cfg).run()
    assert state.status == "done" and (saved / "adapter_model.safetensors").is_file()
    s = NotebookSession()
    s.start_join(None, ephemeral=True, name="notebook", heartbeat=0.5, peer_timeout=3.0)
    try:
        await s.wait_mesh()
        # A volunteer serving layers 2:4 with the adapter merged (what %mesh spawn --adapter starts); it starts
        # while the rest of the set-up runs.
        [volunteer] = s.spawn_local_peers(1, serve=str(tiny), layers=[(2, 4)], extra=["--adapter", str(saved)])
        other = tiny_char_model(tmp_path / "wider", hidden=96)  # same layer names, other shapes
        other_saved = tmp_path / "other-adapter"
        Policy(other, r=4, lora_alpha=8).save(other_saved)
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
        (broken / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes()[:100])
        ids = load_tokenizer(tiny)(PROMPT)["input_ids"]

        s.start_serve({"model": str(tiny), "layers": (0, 4)})
        await s._serve_task
        base = await _served(s, ids)
        server = s.server
        await volunteer.joined
        # Serving the base, the kernel routes around the volunteer that serves the adapter.
        [guard] = [o for o in s.engine.observers if isinstance(o, AdapterGuard)]
        deadline = time.monotonic() + 60
        while guard.avoided_peers() != {volunteer.peer_id}:
            assert time.monotonic() < deadline, s.mesh.state.peers().get(volunteer.peer_id)
            await asyncio.sleep(0.1)
        assert guard.adapter_id is None and [st.peer_id for st in s.engine.current_route()] == [s.mesh.id]

        # Refused in the cell (quick check), one line each, the running serve untouched.
        for path, said in [(tmp_path / "nowhere", "is not a LoRA adapter folder"),
                           (broken, "not a valid safetensors file")]:
            with pytest.raises(BadServeConfig, match=said) as err:
                s.start_serve({"model": str(tiny), "layers": (0, 4), "adapter": str(path)})
            assert "\n" not in str(err.value)
        with pytest.raises(BadServeConfig, match="merges into float weights"):
            s.start_serve({"model": str(tiny), "adapter": str(saved), "quantization": "int8"})
        # An adapter for another model: found out in the background check, before anything runs changes.
        s.start_serve({"model": str(tiny), "layers": (0, 4), "adapter": str(other_saved)})
        with pytest.raises(BadServeConfig, match="another model") as err:
            await s._serve_task
        assert "\n" not in str(err.value) and "96" in str(err.value), err.value
        assert s.server is server and server.runtime is not None
        assert await _served(s, ids) == base

        # The trained adapter: each peer merges its layers' part; the same tokens and log-probs as peft.
        s.start_serve({"model": str(tiny), "layers": (0, 2), "adapter": str(saved)})
        await s._serve_task
        toks, lps = await _served(s, ids)
        route = [(st.peer_id, st.start, st.end) for st in s.engine.current_route()]
        assert route == [(s.mesh.id, 0, 2), (volunteer.peer_id, 2, 4)], route
        want_toks, want_lps = _peft_greedy(tiny, saved, ids)
        base_toks, base_lps = _peft_greedy(tiny, None, ids)
        assert base_toks == base[0] and base_lps == pytest.approx(base[1], abs=1e-4)  # the base serve was the base
        assert toks == want_toks
        assert max(abs(a - b) for a, b in zip(lps, want_lps, strict=True)) < 1e-4, (lps, want_lps)
        assert toks != base_toks or max(abs(a - b) for a, b in zip(lps, base_lps, strict=True)) > 1e-2
        echo = s.mesh.state.peers()[s.mesh.id]["echo"]
        assert echo["adapter_id"] and echo["tag"] == ["adapter", 0], echo
    finally:
        await s.leave()
