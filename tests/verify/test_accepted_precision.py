"""The requester, not the shard, picks the verification limits.

A real int8 shard (bitsandbytes, in process) serves a request and commits to it honestly, announcing
"int8". Where the entry accepts only float32, that shard is not routed to, and its stage is checked
at float32's limits (against a float32 recomputation): it fails. Where the entry accepts int8 too,
the very same commitments pass at int8's limits: that is how much a shard gained by naming its own.
"""

from __future__ import annotations

import asyncio
import secrets

import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.state import MeshState
from gradient_nb.models import load_shard, model_info, resolve_model
from gradient_nb.serve.shard import ShardRuntime
from gradient_nb.verify.commitments import Binding
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.service import StageAudit, VerifyManager
from gradient_nb.verify.simulate import serve_stage


class _Peer:
    def __init__(self, record: dict | None = None) -> None:
        self.identity = Identity.generate()
        self.state, self.id = MeshState(self.identity), self.identity.peer_id
        self.state.heartbeat({"name": self.id[:6], **(record or {})})


def _sync(dst: _Peer, src: _Peer) -> None:
    if hasattr(dst.state, "receive"):
        dst.state.receive(src.state.export())
    else:
        dst.state.doc.apply_update(src.state.doc.get_update())


def test_a_shard_calling_itself_int8_is_not_routed_to_and_is_held_to_float32():
    path = resolve_model()
    info = model_info(path)
    shard = _Peer({"serving": {"model": info.name, "hash": info.content_hash, "dtype": "float32",
                               "quantization": "int8", "layers": [0, 10], "ready": True}})
    me = _Peer()
    _sync(me, shard)
    strict = VerifyManager(me, path, info.content_hash, info.num_layers, policy=SamplingPolicy(0.0),
                           accept=["float32"])
    loose = VerifyManager(me, path, info.content_hash, info.num_layers, policy=SamplingPolicy(0.0),
                          accept=["float32", "int8"])
    assert shard.id in strict.avoided_peers() and shard.id not in loose.avoided_peers()

    # The shard serves a 12-token request honestly at int8 (a prefill, then decode calls) and commits.
    session = secrets.token_hex(8)
    ids = torch.randint(100, 20000, (12,), generator=torch.Generator().manual_seed(3))
    runtime = ShardRuntime(load_shard(path, 0, 10, quantization="int8"))

    async def serve():
        try:
            return await serve_stage(runtime, shard.identity, info.content_hash, [ids], 4,
                                     commit_binding=lambda _i: Binding(info.content_hash, 0, 10, f"{me.id}/{session}"))
        finally:
            await runtime.aclose()

    (served,) = asyncio.run(serve())

    def audit(manager: VerifyManager) -> StageAudit:
        return StageAudit(shard.id, 0, 10, session, False, inputs=[(0, ids)], records=list(served.records),
                          positions=list(served.positions), complete=True,
                          precision=manager._precision_for(shard.id))

    held = audit(strict)
    assert held.precision == "float32"  # what was asked for, whatever the shard announced
    v = asyncio.run(strict.verify_stage(held))
    assert v.status == "fail" and "limit 0.004" in v.reason, v.reason
    named = audit(loose)
    assert named.precision == "int8"
    v = asyncio.run(loose.verify_stage(named))
    assert v.ok, v.reason
