"""Every kernel a mesh peer: the panel's comm target exists from the kernel's start, and each kernel joins
with a key of its own under the user's.

How a kernel gets the target without ``%load_ext``: the package installs
``{sys.prefix}/etc/ipython/ipython_kernel_config.py``, a config file every IPython kernel of that environment
reads when it starts (IPython has no ``.d`` directory of config snippets; this is the environment-level file,
read before the user's profile, which still overrides it). It appends this module to
``InteractiveShellApp.extensions``. Loading it is cheap and joins nothing: it imports only ``comm`` (standard
library), registers the ``gradient_nb.mesh`` comm target and declares ``%mesh``, ``%%parallax``,
``%%verify``, ``%%agents`` and ``%%echo`` as lazy magics (their first use loads the full ``gradient_nb`` extension, torch and aiortc
included, ~2 s). Kernels outside JupyterLab (nbclient, a console) get the same cheap target and nothing else.

Who decides to join: the JupyterLab extension, because the settings (rendezvous URL, mesh, peer name, join
secret, TURN server, auto-join) live in JupyterLab's settings registry, which a kernel cannot read. With
auto-join on, the panel sends a ``join`` request with them as soon as it reaches a kernel that has not
joined; its Join and Leave commands send the same requests. Joining imports the notebook session (off the
event loop) and joins through it, so the magics, the panel and the session see one mesh.

Identity: a kernel joins as a peer of its own: a fresh Ed25519 key made in memory at its first join,
with a certificate signed by the user's persistent key (:func:`~gradient_nb.mesh.identity.kernel_identity`)
that the kernel publishes in its registry record as ``user_cert``. Two notebooks of one user are two peers,
two ids, two routes; the snapshots this module serves name each peer's user when its certificate checks out.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any

from . import comm

__all__ = ["join", "kernel_key", "leave", "load_ipython_extension", "register_comm", "snapshot"]

_SESSION_MODULE = "gradient_nb.notebook.session"
LAZY_MAGICS = ("mesh", "parallax", "verify", "agents", "echo")

_kernel_key: tuple[Any, dict[str, Any]] | None = None
_registered: dict[int, comm.MeshCommTarget] = {}


def kernel_key() -> tuple[Any, dict[str, Any]]:
    """This kernel's ``(Identity, certificate)``: made once per kernel process, signed by the user's key."""
    global _kernel_key
    if _kernel_key is None:
        from ..mesh.identity import kernel_identity

        _kernel_key = kernel_identity(label=_kernel_label())
    return _kernel_key


def _kernel_label() -> str:
    """The kernel's connection file name (``kernel-<id>.json``) when there is one, else its process id."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            return os.path.basename(IPKernelApp.instance().connection_file) or f"pid {os.getpid()}"
    except ImportError:
        pass
    return f"pid {os.getpid()}"


def _session_if_loaded() -> Any | None:
    # Importing the session costs torch and aiortc: a kernel that never joined shows "not joined" without it.
    module = sys.modules.get(_SESSION_MODULE)
    return None if module is None else module.current()


async def _session() -> Any:
    if _SESSION_MODULE not in sys.modules:
        # Seconds of imports: in a thread, so the kernel keeps answering (and the panel keeps its comm).
        await asyncio.to_thread(importlib.import_module, _SESSION_MODULE)
    return sys.modules[_SESSION_MODULE].current()


def snapshot() -> dict[str, Any]:
    """The session's mesh snapshot, each peer with ``user``: its user's peer id, or None (no valid certificate)."""
    session = _session_if_loaded()
    if session is None:
        return {"joined": False}
    snap = session.snapshot()
    mesh = session.mesh
    if mesh is not None and snap.get("joined"):
        from ..mesh.identity import user_of

        users = {p.id: user_of(p.id, p.extra) for p in mesh.peers()}
        for peer in snap.get("peers", []):
            peer["user"] = users.get(peer.get("id"))
    return snap


async def join(url: str | None, name: str | None, *, mesh: str | None = None, secret: str | None = None,
               stun: str | None = None, turn: str | None = None, turn_username: str | None = None,
               turn_password: str | None = None) -> Any:
    """Join as this kernel's own peer (``url`` None: a new local mesh introduced by this kernel)."""
    from ..mesh.ice import IceConfig

    if turn and not (turn_username and turn_password):
        raise ValueError("a TURN server needs its user name and password (gradient-nb settings)")
    session = await _session()
    identity, cert = await asyncio.to_thread(kernel_key)  # reads (or creates) the user's key file
    ice = IceConfig(stun=stun, turn=turn, turn_username=turn_username, turn_password=turn_password)
    joined = await session.start_join(url, name=name, mesh=mesh or "default", secret=secret, ice=ice,
                                      identity=identity)
    joined.publish(user_cert=cert)
    return joined


async def leave() -> None:
    session = _session_if_loaded()
    if session is None or (session.mesh is None and not session.busy):
        raise RuntimeError("this kernel has not joined a mesh")
    await session.leave()


def register_comm(ipython: Any) -> None:
    """Register the panel's comm target on this kernel, once (a second call keeps the open comms)."""
    mine = _registered.get(id(ipython))
    if mine is not None and comm._registered.get(id(ipython)) is mine:
        return
    _registered[id(ipython)] = comm.register(ipython, snapshot, join, leave)


def load_ipython_extension(ipython: Any) -> None:
    """Loaded at every kernel start (see the module doc): the comm target and the lazy magics."""
    if getattr(ipython, "kernel", None) is None:
        return  # a terminal IPython has no front-end to talk to
    register_comm(ipython)
    manager = ipython.magics_manager
    for name in LAZY_MAGICS:
        if name not in manager.magics["line"] and name not in manager.magics["cell"]:
            manager.register_lazy(name, "gradient_nb")


def unload_ipython_extension(ipython: Any) -> None:
    comm.unregister(ipython)
    _registered.pop(id(ipython), None)
