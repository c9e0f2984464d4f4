"""Errors of the mesh layer. Everything the mesh raises on purpose is a :class:`MeshError`.

Remote failures arrive as :class:`RemoteError` carrying only the remote exception's type name (``code``)
and message: a remote traceback would leak the far side's internals and is of no use to the caller.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error the mesh raises deliberately."""


class RemoteError(MeshError):
    """The remote handler failed. ``code`` is the remote exception's type name (or the code a handler chose
    by raising ``RemoteError(code, message)`` itself); ``remote_message`` is its message."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.remote_message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keep the two-argument constructor working for copy/pickle of a *local* exception object.
        return (type(self), (self.code, self.remote_message))


class UnknownMethod(RemoteError):
    """The remote peer offers no such method."""

    def __init__(self, code: str = "UnknownMethod", message: str = "") -> None:
        super().__init__(code, message)


class BadRequest(RemoteError):
    """The remote peer could not decode our frame, or it broke the protocol."""

    def __init__(self, code: str = "BadRequest", message: str = "") -> None:
        super().__init__(code, message)


class CallTimeout(MeshError, TimeoutError):
    """No reply (or no next stream item) within the call's timeout."""


class CallCancelled(MeshError):
    """The call was cancelled (by the remote side, or because the endpoint shut down)."""


class BadFrame(MeshError):
    """A frame failed to decode locally. ``call_id``/``kind`` are set when the header was readable enough
    to tell which call the frame belonged to, so that the receiver can answer that call with an error."""

    def __init__(self, reason: str, *, call_id: int | None = None, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.call_id = call_id
        self.kind = kind


class SignatureInvalid(MeshError):
    """A signed record or message failed verification."""


class JoinRefused(MeshError):
    """The rendezvous (or mesh) refused to let this peer join."""


class PeerUnreachable(MeshError):
    """There is no working link to the peer (it left, or the link closed)."""


class LinkLost(PeerUnreachable):
    """The link to the peer died under a call (no reply to its pings, the connection broke: a NAT
    that forgot its mapping, a router reboot). The peer itself may well be there: the mesh re-links
    at once, so a retry of the call is expected to work."""

    retryable = True


# Remote error codes that have a typed class at the caller. Codes are the exception type names, so a handler
# that itself raises UnknownMethod (e.g. while forwarding a call) arrives as UnknownMethod too.
_TYPED: dict[str, type[RemoteError]] = {"UnknownMethod": UnknownMethod, "BadRequest": BadRequest}


def remote_error(code: str, message: str) -> MeshError:
    """The exception to raise at the caller for an error frame with ``code`` and ``message``."""
    if code == "DeadlineExceeded":
        return CallTimeout(f"the remote handler exceeded the call deadline: {message}")
    if code == "CallCancelled":
        return CallCancelled(f"the remote side cancelled the call: {message}")
    typed = _TYPED.get(code)
    if typed is not None:
        return typed(code, message)
    return RemoteError(code, message)
