"""Direct TCP/TLS links: identity-bound certificates, the dialer's proof, framing, and men in the middle."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gradient_nb.mesh import direct
from gradient_nb.mesh.direct import (
    DialRefused,
    DirectEndpoint,
    DirectLink,
    DirectLinkFailed,
    certificate_peer,
)
from gradient_nb.mesh.errors import SignatureInvalid
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.rpc import RpcEndpoint, Services


class _Side:
    def __init__(self, mesh: str = "m", secret: str | None = None, accept=lambda pid: True) -> None:
        self.identity = Identity.generate()
        self.links: list[DirectLink] = []
        self.arrived = asyncio.Event()

        async def on_link(link: DirectLink) -> None:
            self.links.append(link)
            self.arrived.set()

        self.ep = DirectEndpoint(self.identity, mesh=mesh, secret=secret, accept=accept, on_link=on_link)

    async def __aenter__(self) -> _Side:
        await self.ep.listen("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for link in self.links:
            await link.close()
        await self.ep.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ep.port}"


async def test_certificate_binds_the_tls_key_to_the_identity() -> None:
    ident = Identity.generate()
    pem, _ = direct.make_certificate(ident)
    import ssl

    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    assert certificate_peer(der)[0] == ident.peer_id
    # The same extension on a certificate for another TLS key does not verify.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_der_x509_certificate(der)
    ext = cert.extensions.get_extension_for_oid(direct.EXTENSION_OID).value
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
              .public_key(other.public_key()).serial_number(1).not_valid_before(cert.not_valid_before_utc)
              .not_valid_after(cert.not_valid_after_utc).add_extension(ext, critical=False)
              .sign(other, hashes.SHA256()))
    with pytest.raises(SignatureInvalid):
        certificate_peer(forged.public_bytes(Encoding.DER))


async def test_link_carries_rpc_both_ways_and_reports_its_kind() -> None:
    async with _Side() as a, _Side() as b:
        link = await b.ep.dial(a.identity.peer_id, [a.address])
        await asyncio.wait_for(a.arrived.wait(), 5)
        there = a.links[0]
        assert there.remote_id == b.identity.peer_id and link.remote_id == a.identity.peer_id
        services = Services()

        async def echo(msg: Message, ctx) -> Message:
            return Message(dict(msg.header, by=ctx.peer_id), dict(msg.tensors))

        services.unary("echo", echo)
        server = RpcEndpoint(there.transports["rpc"], services, remote_id=b.identity.peer_id)
        client = RpcEndpoint(link.transports["rpc"], Services(), remote_id=a.identity.peer_id)
        await server.start()
        await client.start()
        import torch

        big = torch.randn(1024, 1024)
        reply = await client.call("echo", Message({"k": 1}, {"t": big}), timeout=20)
        assert reply.header["k"] == 1 and torch.equal(reply.tensors["t"], big)
        # messages in order on the other channel, both ways
        for i in range(50):
            await link.transports["state"].send(bytes([i]) * (i * 1000 + 1))
        for i in range(50):
            assert await there.transports["state"].recv() == bytes([i]) * (i * 1000 + 1)
        assert await link.ping() > 0
        stats = link.stats()
        assert stats.kind == "direct-tcp" and not stats.relayed and stats.rtt_ms is not None
        await client.close()
        await server.close()


async def test_a_rogue_listener_cannot_answer_for_a_peer() -> None:
    """A man in the middle who points the advertised address at its own listener: its certificate
    names another identity, so the dial fails before anything is sent."""
    async with _Side() as real, _Side() as rogue, _Side() as dialer:
        with pytest.raises(DirectLinkFailed, match="answered as peer"):
            await dialer.ep.dial(real.identity.peer_id, [rogue.address])
        assert not rogue.links  # the rogue got no authenticated link either


async def test_a_rogue_with_a_copied_identity_extension_fails() -> None:
    """The rogue presents a certificate carrying the real peer's identity extension on its own TLS key."""
    async with _Side() as real, _Side() as dialer:
        from cryptography import x509

        pem, _ = direct.make_certificate(real.identity)
        ext = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_oid(direct.EXTENSION_OID).value
        original = direct.make_certificate

        def copied(identity: Identity):
            cert_pem, key_pem = original(identity)
            from cryptography.hazmat.primitives import hashes, serialization

            key = serialization.load_pem_private_key(key_pem, None)
            cert = x509.load_pem_x509_certificate(cert_pem)
            forged = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
                      .public_key(key.public_key()).serial_number(1).not_valid_before(cert.not_valid_before_utc)
                      .not_valid_after(cert.not_valid_after_utc).add_extension(ext, critical=False)
                      .sign(key, hashes.SHA256()))
            return forged.public_bytes(serialization.Encoding.PEM), key_pem

        direct.make_certificate = copied
        try:
            rogue = _Side()
        finally:
            direct.make_certificate = original
        async with rogue:
            with pytest.raises(DirectLinkFailed, match="not signed by the identity key"):
                await dialer.ep.dial(real.identity.peer_id, [rogue.address])


async def test_a_relaying_man_in_the_middle_sees_only_ciphertext() -> None:
    """A rendezvous that rewrites the address to a TCP relay of its own: the link works (TLS is end
    to end, bound to the real peer) and the relay never sees a byte of plaintext."""
    seen = bytearray()
    async with _Side() as a, _Side() as b:
        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await r.read(65536):
                    seen.extend(data)
                    w.write(data)
                    await w.drain()
            w.close()

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", a.ep.port)
            await asyncio.gather(pipe(r, uw), pipe(ur, w))

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            link = await b.ep.dial(a.identity.peer_id, [f"127.0.0.1:{port}"])
            await asyncio.wait_for(a.arrived.wait(), 5)
            secret = b"the-plaintext-a-relay-must-not-see" * 10
            await link.transports["rpc"].send(secret)
            assert await a.links[0].transports["rpc"].recv() == secret
            assert a.links[0].remote_id == b.identity.peer_id
            assert secret[:34] not in bytes(seen) and len(seen) > len(secret)
            await link.close()
        finally:
            server.close()


async def test_join_secret_is_checked_both_ways_and_glare_refuses() -> None:
    async with _Side(secret="s1") as a, _Side(secret="s2") as b, _Side(secret="s1") as c:
        with pytest.raises(DirectLinkFailed):
            await b.ep.dial(a.identity.peer_id, [a.address])
        assert a.ep.rejected == 1 and not a.links
        link = await c.ep.dial(a.identity.peer_id, [a.address])
        await link.close()
    async with _Side(accept=lambda pid: False) as a, _Side() as b:
        with pytest.raises(DialRefused):
            await b.ep.dial(a.identity.peer_id, [a.address])


async def test_a_silent_peer_is_detected_dead_within_seconds() -> None:
    """When the far side stops answering (a NAT that forgot the mapping drops every packet), the link
    closes on its own after missed pings, with the reason, and pending receives fail."""
    async with _Side() as a, _Side() as b:
        link = await b.ep.dial(a.identity.peer_id, [a.address])
        await asyncio.wait_for(a.arrived.wait(), 5)
        link._dead_after = 1.5
        # The far side goes silent: its reader and pinger stop, the socket stays open.
        for t in list(a.links[0]._tasks):
            t.cancel()
        closed = asyncio.Event()
        link.on_close.append(closed.set)
        recv = asyncio.ensure_future(link.transports["rpc"].recv())
        await asyncio.wait_for(closed.wait(), 10)
        assert "no reply to pings" in (link.lost_reason or "")
        with pytest.raises(direct.LinkClosed, match="no reply to pings"):
            await recv


def test_mesh_status_prints_the_link_kind() -> None:
    from gradient_nb.cli import format_peers

    snap = {"peers": [], "links": [{"a": "a" * 40, "b": "b" * 40, "kind": "direct-tcp", "type": "host",
                                    "relayed": False, "rtt_ms": 0.4},
                                   {"a": "a" * 40, "b": "c" * 40, "type": "relay", "relayed": True, "rtt_ms": 9.0}]}
    text = format_peers(snap)
    assert "direct-tcp" in text and "webrtc-relay" in text


async def test_bench_transport_direct_row_smoke() -> None:
    from gradient_nb.bench.transport import _measure_direct

    row = await _measure_direct(1024, 5, 64 << 10, 256 << 10)
    assert row["tls"] == "TLSv1.3" and row["rtt_median_ms"] > 0 and row["bulk_mb_s"] > 0
