"""A headless peer with the test-only ``diag.*`` services (:mod:`.diagnostics`), for tests and labs.

    python -m gradient_nb.testing.diagpeer peer --rendezvous ws://HOST:PORT [any gradient-nb peer option]

It is ``gradient-nb peer`` plus those services; a volunteer's ``gradient-nb peer`` never offers them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from ..cli import _cmd_peer, build_parser
from . import diagnostics

MODULE = "gradient_nb.testing.diagpeer"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv if argv[:1] == ["peer"] else ["peer", *argv])
    return int(asyncio.run(_cmd_peer(args, setup=diagnostics.install)) or 0)


if __name__ == "__main__":
    sys.exit(main())
