"""gradient-nb: decentralized AI from a notebook.

The public API is small:

- :func:`join` a mesh (``await gradient_nb.join("ws://host:8765")``) and get a :class:`Mesh`: list
  ``peers()``, ``offer``/``call``/``stream`` services, read and watch ``state``, query the ``dht``,
  ``leave()``.
- :class:`Rendezvous`: the introducer, embeddable in any asyncio program.
- :class:`Identity`: a peer's Ed25519 key.
- ``%load_ext gradient_nb`` in IPython/Jupyter: the ``%mesh`` and ``%%parallax`` magics.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["IceConfig", "Identity", "Mesh", "Message", "Rendezvous", "join", "load_ipython_extension"]


def __getattr__(name: str) -> Any:
    # Imported lazily: `gradient-nb --help` and the magics' loading should not pay for aiortc and torch.
    if name in ("Mesh", "join"):
        from .mesh import peer

        return getattr(peer, name)
    if name == "Rendezvous":
        from .mesh.rendezvous import Rendezvous

        return Rendezvous
    if name == "Identity":
        from .mesh.identity import Identity

        return Identity
    if name == "IceConfig":
        from .mesh.ice import IceConfig

        return IceConfig
    if name == "Message":
        from .mesh.frames import Message

        return Message
    raise AttributeError(name)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext gradient_nb``: the magics, and the comm the JupyterLab Mesh panel talks to."""
    from .notebook import autojoin
    from .notebook.agents_magic import AgentsMagics
    from .notebook.echo_magic import EchoMagics
    from .notebook.magics import GradientMagics
    from .notebook.session import current
    from .notebook.verify_magic import VerifyMagics

    ipython.register_magics(GradientMagics)
    ipython.register_magics(VerifyMagics)
    ipython.register_magics(AgentsMagics)
    ipython.register_magics(EchoMagics)
    current()
    # The panel's comm: usually registered at kernel start already (gradient_nb.notebook.autojoin).
    autojoin.register_comm(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook import autojoin

    autojoin.unload_ipython_extension(ipython)
