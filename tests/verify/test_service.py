"""The entry peer's audit bookkeeping: what it keeps, what it releases, what it does with junk."""

from __future__ import annotations

import pytest
import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.state import MeshState
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.service import StageAudit, VerifyManager


class _Peer:
    def __init__(self) -> None:
        ident = Identity.generate()
        self.state, self.id = MeshState(ident), ident.peer_id


def _manager(rate: float = 0.0) -> VerifyManager:
    return VerifyManager(_Peer(), "unused", "ab" * 32, 30, policy=SamplingPolicy(rate), keep=4, keep_inputs=2)


def test_inputs_are_released_for_older_finished_requests():
    m = _manager()
    audits = []
    for _ in range(4):
        a = m.begin([(0, 10), (10, 30)])
        m.on_call(a, "p" * 40, 0, 10, "s", 0, torch.arange(5), {})
        m.on_call(a, "q" * 40, 10, 30, "s", 0, torch.zeros(5, 8), {})
        a.done.set()
        audits.append(a)
    m.begin([(0, 10), (10, 30)])
    assert all(s.trimmed and not s.inputs for a in audits[:3] for s in a.stages.values())
    assert all(not s.trimmed and s.inputs for s in audits[3].stages.values())


def test_positions_and_sequence_per_stage():
    m = _manager()
    a = m.begin([(0, 10), (10, 30)])
    m.on_call(a, "p" * 40, 0, 10, "s", 0, torch.arange(4), {})
    m.on_call(a, "p" * 40, 0, 10, "s", 4, torch.tensor([9]), {})
    m.on_call(a, "q" * 40, 10, 30, "s", 0, torch.zeros(4, 8), {})
    m.on_call(a, "q" * 40, 10, 30, "s", 4, torch.ones(1, 8), {})
    first = a.stages["s", "p" * 40, 0, 10]
    last = a.stages["s", "q" * 40, 10, 30]
    assert first.positions == [0, 1, 2, 3, 4] and last.positions == [3, 4]  # the last stage: logits only
    assert first.sequence().tolist() == [0, 1, 2, 3, 9]
    gap = StageAudit("p" * 40, 0, 10, "t", False, inputs=[(0, torch.arange(2)), (3, torch.arange(1))])
    with pytest.raises(ValueError, match="skip"):  # a gap in the inputs is never verified
        gap.sequence()


def test_junk_commit_headers_become_rejectable_records():
    m = _manager()
    a = m.begin([(0, 30)])
    m.on_call(a, "p" * 40, 0, 30, "s", 0, torch.arange(3), {"commit": "not a list"})
    m.on_drop(a, "p" * 40, 0, 30, "s", {"commit": [1, 2]})
    s = a.stages["s", "p" * 40, 0, 30]
    assert s.complete and s.records == [{"malformed": True}, 1, 2]


def test_sampling_marks_whole_layer_ranges():
    m = _manager(rate=1.0)
    a = m.begin([(0, 10), (10, 30)])
    assert a.sampled == {(0, 10), (10, 30)}
    assert _manager(rate=0.0).begin([(0, 10)]).sampled == set()


def test_the_last_stage_draws_are_recorded_with_their_specs():
    m = _manager()
    a = m.begin([(0, 10), (10, 30)])
    spec = {"temperature": 0.7, "top_p": 0.9, "seed": 5, "step": 0}
    m.on_call(a, "p" * 40, 0, 10, "s", 0, torch.arange(4), {"token": 3, "sample": spec})  # not the last stage
    m.on_call(a, "q" * 40, 10, 30, "s", 0, torch.zeros(4, 8), {"token": 7, "sample": spec})
    m.on_call(a, "q" * 40, 10, 30, "s", 4, torch.ones(1, 8), {"token": 9, "sample": {**spec, "step": 1}})
    m.on_call(a, "q" * 40, 10, 30, "s", 5, torch.ones(1, 8), {"token": "junk", "sample": spec})
    assert a.stages["s", "p" * 40, 0, 10].draws == []
    assert a.stages["s", "q" * 40, 10, 30].draws == [(3, 7, spec), (4, 9, {**spec, "step": 1})]
