"""The one-cell volunteer: join a mesh by URL and serve the layers the mesh gives this machine.

``await volunteer(url)`` is what ``notebooks/volunteer.ipynb`` runs (Colab, Kaggle, any notebook):

1. Join as this kernel's own peer (:func:`gradient_nb.notebook.autojoin.join`: a per-kernel key under the
   user's), with the STUN/TURN servers given. Cloud notebooks have no inbound connectivity and may sit
   behind NATs that map per destination (symmetric): give the mesh's TURN server, and links relay through
   it when nothing direct works.
2. Pick the device: CUDA when torch sees a GPU (float16 weights, bitsandbytes ``nf4`` by default, or
   ``int8``), else the CPU (float32, or the quantization asked for).
3. Serve: a :class:`~gradient_nb.serve.node.ServingPeer` whose layers the mesh's coordinator assigns (or
   the fixed ``layers``), with signed commitments so its work can be verified; it waits until the layers
   are loaded, then prints what it serves and its links (candidate type, direct or relayed).

The serving runs on the kernel's event loop after the cell returns; ``%mesh leave`` (or the panel's Leave,
or shutting the kernel down) stops it and hands its layers over.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Volunteer", "pick_device", "volunteer"]

LOAD_TIMEOUT = 600.0  # a GGUF is de-quantised once (~20 s on 2 cores); a large model on a slow disk takes more


def pick_device(quantization: str | None = "auto", *, cuda: bool | None = None) -> tuple[str, str, str | None]:
    """``(device, dtype, quantization)`` for this machine: nf4 on CUDA unless told otherwise, float32 on CPU."""
    if quantization not in ("auto", None, "nf4", "int8"):
        raise ValueError(f"quantization is auto, None, nf4 or int8, not {quantization!r}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return "cuda", "float16", "nf4" if quantization == "auto" else quantization
    return "cpu", "float32", None if quantization == "auto" else quantization


@dataclass
class Volunteer:
    """What ``volunteer()`` started: the mesh, the serving peer, and how it serves."""

    mesh: Any
    server: Any
    device: str
    dtype: str
    quantization: str | None

    def links(self) -> list[str]:
        """One line per link: the other peer, the candidate types of both ends, direct or via TURN, RTT."""
        names = {p.id: p.name for p in self.mesh.peers()}
        out = []
        for pid, lk in sorted(self.mesh.links().items(), key=lambda kv: names.get(kv[0], kv[0])):
            path = "relayed (TURN)" if lk["relayed"] else "direct"
            rtt = f", rtt {lk['rtt_ms']:.1f} ms" if lk.get("rtt_ms") is not None else ""
            out.append(f"{names.get(pid, pid[:8])}: {lk['local_type']} → {lk['type']}, {path}{rtt}")
        return out

    def summary(self) -> str:
        start, end = self.server.layers
        how = self.dtype + (f", {self.quantization}" if self.quantization else "")
        lines = [f"serving layers {start}–{end} of {self.server.model_id} on {self.device} ({how}) "
                 f"as {self.mesh.name} ({self.mesh.id[:8]}) in mesh {self.mesh.mesh_name!r}",
                 *(f"  link to {line}" for line in self.links())]
        if len(lines) == 1:
            lines.append("  no links yet (peers link when they route through this one)")
        return "\n".join(lines)


async def volunteer(url: str, *, mesh: str = "default", name: str | None = None, secret: str | None = None,
                    stun: str | None = None, turn: str | None = None, turn_username: str | None = None,
                    turn_password: str | None = None, model: str | None = None,
                    layers: tuple[int, int] | None = None, quantization: str | None = "auto",
                    memory_cap_bytes: int | None = None, quiet: bool = False) -> Volunteer:
    """Join the mesh at ``url`` and serve there with this machine's GPU or CPU (see the module doc)."""
    from . import autojoin
    from .session import current

    device, dtype, quant = pick_device(quantization)
    session = current()
    joined = session.mesh or await autojoin.join(url, name, mesh=mesh, secret=secret, stun=stun, turn=turn,
                                                turn_username=turn_username, turn_password=turn_password)
    from ..serve.node import ServingPeer
    from ..serve.weights_sync import progress_printer
    from ..verify import attach_commitments

    # Built off the loop (resolving the model de-quantises a GGUF once); without the model on this machine,
    # its weights come from the peers that serve it, the assigned layers only (serve/weights_sync.py).
    server = await ServingPeer.open(joined, model, dtype=dtype, quantization=quant, layers=layers,
                                    memory_cap_bytes=memory_cap_bytes, device=device,
                                    on_weights_progress=None if quiet else progress_printer(sys.stdout))
    attach_commitments(server)  # a volunteer's outputs are verifiable
    await server.start()
    session.server = server  # %mesh leave and the kernel's exit stop it
    deadline = time.monotonic() + LOAD_TIMEOUT
    while getattr(server, "layers", None) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no layers loaded after {LOAD_TIMEOUT:g} s (is a coordinator assigning any?)")
        await asyncio.sleep(0.2)
    result = Volunteer(joined, server, device, dtype, quant)
    if not quiet:
        print(result.summary())
    return result
