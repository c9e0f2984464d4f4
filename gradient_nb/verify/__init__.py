"""VeriLLM-style verification of remote inference: commitments, prefill re-computation, verdicts.

Kept light on purpose: ``serve`` imports the commitment builder from here, so nothing heavier than
the commitments and the verifier is imported at package level.
"""

from .commitments import BadCommitment, Binding, Commitment, CommitmentBuilder, open_commitment
from .policy import SamplingPolicy
from .verifier import Tolerance, Verdict, verify_commitments, verify_stage

__all__ = ["BadCommitment", "Binding", "Commitment", "CommitmentBuilder", "SamplingPolicy", "Tolerance",
           "Verdict", "open_commitment", "verify_commitments", "verify_stage"]
