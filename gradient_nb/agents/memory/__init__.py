"""Verifiable shared memory for the agents (SEDM, arXiv 2509.24257).

- ``records``: items (content-addressed), replay records, signed entries, ``check_entry``;
- ``admission``: the replay solver, ``admit`` (A/B by reproducible replay), ``verify_entry``, ``distill``
  (a worked example from a trajectory) and ``abstract`` (cross-domain diffusion);
- ``controller``: ``Memory``: utility, retrieval by the embedder, merge, decay, eviction under a budget;
- ``shared``: ``SharedMemory``: entries in the mesh state, announced and found through the DHT.
"""

from .admission import ToolCallSolver, abstract, admit, distill, verify_entry
from .controller import Memory
from .records import Entry, Item, check_entry
from .shared import SharedMemory

__all__ = ["Entry", "Item", "Memory", "SharedMemory", "ToolCallSolver", "abstract", "admit", "check_entry",
           "distill", "verify_entry"]
