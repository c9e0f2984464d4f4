"""Shared notebooks end to end: two real Jupyter servers (jupyter-collaboration), two mesh peers bridging
them, and Python Yjs clients in each server's room acting as the two users."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections import Counter
from contextlib import asynccontextmanager

import msgpack
import pytest
from jupyter_ydoc import YNotebook

from gradient_nb.mesh.errors import RemoteError
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.notebook.share import CapabilityRefused, ShareError, capability, open_shared, share_notebook
from gradient_nb.notebook.share.bridge import CHUNK_BYTES, OPEN, PUSH
from gradient_nb.notebook.share.capability import decode_code
from gradient_nb.notebook.share.harness import Server, User, eventually, join_peer
from gradient_nb.notebook.share.yproto import TaggedDoc

pytestmark = pytest.mark.slow


@asynccontextmanager
async def shared_notebook(a, b, alice: Server, bob: Server, cells: list[str], discover: bool = False,
                          **share_kw):
    """Alice shares a new notebook with ``cells``; Bob opens it. Both ends are closed afterwards."""
    name = alice.write(f"nb-{secrets.token_hex(3)}.ipynb", cells)
    share = await share_notebook(a, name, server_url=alice.url, token=alice.jupyter.token, **share_kw)
    try:
        if discover:  # Bob's kernel finds his server, its token and its YStore from `jupyter server list`
            shared = await open_shared(b, share.code)
        else:
            shared = await open_shared(b, share.code, server_url=bob.url, token=bob.jupyter.token,
                                       ystore_db=bob.ystore)
        try:
            yield name, share, shared
        finally:
            await shared.close()
    finally:
        await share.close()


def _no_duplicates(user: User) -> bool:
    return all(n == 1 for n in Counter(user.cell_ids()).values())


async def test_edits_outputs_and_presence_cross_both_ways(servers, peers, monkeypatch) -> None:
    alice_server, bob_server = servers
    a, b = peers
    # Only Bob's server is listed where his kernel looks (JUPYTER_RUNTIME_DIR).
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(bob_server.runtime))
    async with shared_notebook(a, b, alice_server, bob_server, ["x = 1", "print(x)"], discover=True) as (
            name, share, shared):
        assert shared.path == f"shared/{name}" and shared.mode == "rw"
        assert (bob_server.root / shared.path).exists()
        async with User(alice_server, name, "alice") as alice, User(bob_server, shared.path, "bob") as bob:
            # Bob's lab starts from Alice's notebook: the same cells, once each.
            assert bob.sources() == alice.sources() == ["x = 1", "print(x)"]
            assert bob.cell_ids() == alice.cell_ids()

            alice.type_into(0, "0", at=5)  # "x = 10"
            await eventually(lambda: bob.sources()[0] == "x = 10", what="Alice's typing in Bob's lab")
            bob.add_cell("y = x * 2", index=1)
            await eventually(lambda: alice.sources() == ["x = 10", "y = x * 2", "print(x)"],
                             what="Bob's new cell in Alice's lab")
            alice.write_output(2, "10\n")
            await eventually(lambda: bob.outputs(2) == [{"output_type": "stream", "name": "stdout",
                                                        "text": "10\n"}], what="Alice's output in Bob's lab")
            # Outputs bigger than a mesh chunk (a plot, a long log) cross both ways, in pieces.
            big = "#" * (CHUNK_BYTES * 2 + 1000)
            bob.write_output(1, big)
            alice.write_output(0, big.replace("#", "="))
            await eventually(lambda: alice.outputs(1) and alice.outputs(1)[0]["text"] == big
                             and bob.outputs(0) and bob.outputs(0)[0]["text"] == big.replace("#", "="),
                             what="big outputs on both sides")

            def presence() -> bool:
                alice.announce()
                bob.announce()
                return "bob" in alice.names_seen() and "alice" in bob.names_seen()

            await eventually(presence, what="each user's presence in the other's lab")
            await eventually(lambda: alice.nb.get() == bob.nb.get(), what="identical documents")
            assert _no_duplicates(alice) and _no_duplicates(bob)
            assert share.peers() == [(b.id, "rw")]


async def test_read_only_edits_never_reach_the_owner(servers, peers) -> None:
    alice_server, bob_server = servers
    a, b = peers
    async with shared_notebook(a, b, alice_server, bob_server, ["a = 1"], mode="ro") as (name, share, shared):
        assert shared.mode == "ro"
        async with User(alice_server, name, "alice") as alice, User(bob_server, shared.path, "bob") as bob:
            bob.type_into(0, "# bob was here\n", at=0)
            alice.add_cell("b = 2")  # a marker: once Bob sees it, his own edit had time to travel
            await eventually(lambda: bob.sources()[-1] == "b = 2", what="Alice's edit in Bob's lab")
            assert alice.sources() == ["a = 1", "b = 2"]

        # A joiner that ignores its read-only mode and pushes anyway is refused by the owner's bridge.
        sid = secrets.token_hex(8)
        stream = b.stream(a.id, OPEN, Message({"cap": shared.cap.record, "sv": b"\x00", "session": sid}))
        try:
            hello = (await anext(stream)).header
            assert hello["mode"] == "ro"
            before = share.doc.diff()
            edit = TaggedDoc()  # any valid Yjs update will do: a notebook with one more cell
            YNotebook(edit.doc).append_cell({"cell_type": "code", "source": "import os", "metadata": {},
                                             "outputs": [], "execution_count": None})
            with pytest.raises(RemoteError) as err:
                await b.call(a.id, PUSH, Message({"session": sid, "u": edit.diff(), "more": False}))
            assert err.value.code == "PermissionError"
            assert share.refused_updates == 1
            assert share.doc.diff() == before
        finally:
            await stream.aclose()


async def test_no_valid_capability_no_document(servers, peers, rendezvous, monkeypatch) -> None:
    alice_server, bob_server = servers
    a, b = peers
    name = alice_server.write(f"nb-{secrets.token_hex(3)}.ipynb", ["secret = 42"])
    share = await share_notebook(a, name, server_url=alice_server.url, token=alice_server.jupyter.token,
                                 grantee=b.id)
    open_kw = {"server_url": bob_server.url, "token": bob_server.jupyter.token, "ystore_db": bob_server.ystore}
    try:
        # Forged: Alice's payload signed by Mallory's key. The joiner's own check sees it first; the owner
        # refuses it too when a peer presents it anyway.
        mallory = Identity.generate()
        forged = sign_record(mallory, decode_code(share.code).record["payload"])
        with pytest.raises(ShareError, match="forged"):
            await open_shared(b, _code_of(forged), path="shared/forged.ipynb", **open_kw)
        with pytest.raises(RemoteError) as err:
            await anext(b.stream(a.id, OPEN, Message({"cap": forged, "sv": b"\x00", "session": "ab" * 8})))
        assert err.value.code == "CapabilityRefused"
        # Bound to Bob: a third peer of the mesh presenting Bob's code is refused by the owner.
        carol = await join_peer(rendezvous, "carol", mesh=a.mesh_name)
        try:
            with pytest.raises(CapabilityRefused, match="bound to peer"):
                await open_shared(carol, share.code, path="shared/carol.ipynb", **open_kw)
        finally:
            await carol.leave()
        # Expired bearer code (valid for a millisecond; the owner allows no clock skew in this test).
        monkeypatch.setattr(capability, "CLOCK_SKEW_S", 0.0)
        expired = share.grant(expires_in=0.001)
        await asyncio.sleep(0.01)
        with pytest.raises(CapabilityRefused, match="expired"):
            await open_shared(b, expired, path="shared/expired.ipynb", **open_kw)
        # Revoked, and damaged codes.
        revoked = share.grant(grantee=b.id, mode="ro")
        share.revoke(revoked)
        with pytest.raises(CapabilityRefused, match="revoked"):
            await open_shared(b, revoked, path="shared/revoked.ipynb", **open_kw)
        for bad in ["", "hello", "gnbshare1.", "gnbshare1.!!!!", share.code[:-8], "gnbshare1." + "A" * 5000]:
            with pytest.raises(ShareError):
                await open_shared(b, bad, **open_kw)
        assert share.peers() == []
        for p in ("forged", "carol", "expired", "revoked"):
            assert not (bob_server.root / "shared" / f"{p}.ipynb").exists()
        # The valid code still works, until the owner revokes it: the live session ends, and the joiner
        # stops retrying with the owner's reason.
        shared = await open_shared(b, share.code, **open_kw)
        try:
            share.revoke(share.code)
            await eventually(lambda: shared.refused, what="the joiner to be refused")
            assert "revoked" in shared.error and share.peers() == []
        finally:
            await shared.close()
    finally:
        await share.close()


def _code_of(record: dict) -> str:
    return "gnbshare1." + base64.urlsafe_b64encode(msgpack.packb(record, use_bin_type=True)).decode().rstrip("=")


async def test_edits_while_apart_merge_on_reconnect(servers, peers) -> None:
    alice_server, bob_server = servers
    a, b = peers
    async with shared_notebook(a, b, alice_server, bob_server, ["one", "two"]) as (name, share, shared):
        async with User(alice_server, name, "alice") as alice, User(bob_server, shared.path, "bob") as bob:
            await eventually(lambda: bob.sources() == ["one", "two"], what="the first sync")
            await shared.suspend()  # the bridge's stream stops: edits on both sides stay local
            alice.add_cell("alice offline", index=1)
            alice.type_into(0, " (alice)")
            bob.add_cell("bob offline")
            bob.type_into(0, "[bob] ", at=0)
            await eventually(lambda: share.peers() == [], what="the owner to see the session end")
            assert "bob offline" not in alice.sources() and "alice offline" not in bob.sources()
            shared.resume()
            want = ["[bob] one (alice)", "alice offline", "two", "bob offline"]
            await eventually(lambda: alice.sources() == want and bob.sources() == want,
                             what=f"both sides to converge on {want}")

            # A real link failure: the stream breaks, the bridge re-links and resyncs by itself.
            sessions = shared.sessions
            await b._drop_link(a.id)
            await eventually(lambda: shared.sessions > sessions and shared.connected.is_set(), 30,
                             what="a new session after the link dropped")
            bob.type_into(1, "!")
            alice.add_cell("after the drop")
            await eventually(lambda: alice.nb.get() == bob.nb.get() and alice.sources()[1] == "alice offline!"
                             and bob.sources()[-1] == "after the drop", what="convergence after the drop")
            assert _no_duplicates(alice) and _no_duplicates(bob)
            assert len(alice.cell_ids()) == 5


async def test_reopening_resyncs_instead_of_seeding_again(servers, peers, tmp_path) -> None:
    alice_server, bob_server = servers
    a, b = peers
    async with shared_notebook(a, b, alice_server, bob_server, ["first"]) as (name, share, shared):
        path = shared.path
        await shared.close()
        async with User(alice_server, name, "alice") as alice:
            alice.add_cell("while bob was away")
            # Bob opens the same share again (a restarted kernel): the file exists, his server kept its
            # history, and the two resync by state vector: nothing seeded twice.
            again = await open_shared(b, share.code, server_url=bob_server.url, token=bob_server.jupyter.token,
                                      path=path, ystore_db=bob_server.ystore)
            try:
                async with User(bob_server, path, "bob") as bob:
                    await eventually(lambda: bob.sources() == ["first", "while bob was away"],
                                     what="the edit made while Bob was away")
                    assert _no_duplicates(bob)
            finally:
                await again.close()
        # Bob's server keeps its YStore elsewhere than where he said: his room seeds from the file, and
        # that is caught before anything merges, the file made for it removed again.
        with pytest.raises(ShareError, match="seeded from its file"):
            await open_shared(b, share.code, server_url=bob_server.url, token=bob_server.jupyter.token,
                              path="shared/elsewhere.ipynb", ystore_db=tmp_path / "not-the-servers.db")
        assert not (bob_server.root / "shared" / "elsewhere.ipynb").exists()
        # A different notebook already at that path has another seed: refused before anything merges.
        other = bob_server.write("shared/other.ipynb", ["not the shared one"])
        with pytest.raises(ShareError, match="seeded from its file"):
            await open_shared(b, share.code, server_url=bob_server.url, token=bob_server.jupyter.token,
                              path=other, ystore_db=bob_server.ystore)


async def test_a_third_lab_joins_and_edits_reach_everyone(servers, peers, rendezvous) -> None:
    alice_server, bob_server = servers
    a, b = peers
    carol = await join_peer(rendezvous, "carol", mesh=a.mesh_name)
    try:
        async with shared_notebook(a, b, alice_server, bob_server, ["shared"]) as (name, share, shared):
            # Carol's notebook lives in another room (here on Bob's server, under another path).
            code = share.grant(expires_in=600)  # a bearer code: whoever holds it, for ten minutes
            theirs = await open_shared(carol, code, server_url=bob_server.url, token=bob_server.jupyter.token,
                                       path=f"carol/{name}", ystore_db=bob_server.ystore)
            try:
                async with User(alice_server, name, "alice") as alice, \
                        User(bob_server, shared.path, "bob") as bob, \
                        User(bob_server, theirs.path, "carol") as carol_user:
                    carol_user.add_cell("from carol")
                    bob.type_into(0, " by bob")
                    users = (alice, bob, carol_user)
                    await eventually(lambda: all(u.sources() == ["shared by bob", "from carol"] for u in users),
                                     what="every lab to show every edit")
                    assert sorted(p for p, _ in share.peers()) == sorted([b.id, carol.id])
                    assert all(_no_duplicates(u) for u in users)
            finally:
                await theirs.close()
    finally:
        await carol.leave()
