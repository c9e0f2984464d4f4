"""VeriLLM-style verification of remote inference: commitments, prefill re-computation, verdicts.

It plugs into serving through ``serve``'s observer hooks: :func:`attach_commitments` on a serving
peer, :func:`attach_verification` on an entry peer's engine.
"""

from .attach import TEST_FAULT_ENV, attach_commitments, attach_verification, verification_of
from .commitments import BadCommitment, Binding, Commitment, CommitmentBuilder, open_commitment
from .policy import SamplingPolicy
from .verifier import Tolerance, Verdict, verify_commitments, verify_stage

__all__ = ["TEST_FAULT_ENV", "BadCommitment", "Binding", "Commitment", "CommitmentBuilder", "SamplingPolicy",
           "Tolerance", "Verdict", "attach_commitments", "attach_verification", "open_commitment",
           "verification_of", "verify_commitments", "verify_stage"]
