"""Each kernel a mesh peer, without %load_ext: real kernels of this environment, a real mesh.

A fresh kernel answers the Mesh panel's comm at once (the target is registered at kernel start by
``etc/ipython/ipython_kernel_config.py``); a ``join`` request with the panel's settings joins it as a peer
of its own, under the user's key. Two kernels of one user are two peers, both routable, both shown as the
user's, and another peer's ``gradient-nb mesh status`` lists them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from test_comm import REPO, Kernel, is_reply, is_snapshot

from gradient_nb.mesh.identity import Identity

pytestmark = [pytest.mark.slow]


class EnvKernel(Kernel):
    """test_comm's comm driver, on a kernel with its own environment (the user's key directory)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(REPO), env={**os.environ, **env})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.comm_id = ""


@pytest.fixture
def kernels(tmp_path: Path) -> Iterator[tuple[EnvKernel, EnvKernel, Path]]:
    env = {"GRADIENT_NB_HOME": str(tmp_path)}
    a = EnvKernel(env)
    try:
        b = EnvKernel(env)
        try:
            yield a, b, tmp_path
        finally:
            b.stop()
    finally:
        a.stop()


def test_environment_installs_the_kernel_config() -> None:
    # What the wheel's shared-data puts in the environment is what this checkout holds.
    installed = Path(sys.prefix) / "etc" / "ipython" / "ipython_kernel_config.py"
    assert installed.read_text() == (REPO / "etc" / "ipython" / "ipython_kernel_config.py").read_text()


def test_two_fresh_kernels_join_from_the_panel_as_two_peers_of_one_user(kernels) -> None:
    a, b, home = kernels
    # No %load_ext: the target is there, and the kernel has not joined.
    a.open_comm()
    assert a.next_data(is_snapshot(), "a's first snapshot")["snapshot"] == {"joined": False}
    a.execute("import sys; assert 'torch' not in sys.modules and 'gradient_nb.notebook.session' not in sys.modules")

    # The panel's Join with an empty URL: a new local mesh, introduced by this kernel.
    a.send({"request": "join", "local": True, "name": "nb-a", "mesh": "lab", "id": 1})
    reply = a.next_data(is_reply("join"), "a's join reply")
    assert reply["ok"] is True, reply
    snap_a = a.next_data(is_snapshot(lambda s: s.get("joined") is True and any(p.get("user") for p in s["peers"])),
                         "a joined, with its certificate")["snapshot"]
    url = snap_a["rendezvous"]
    user = Identity.load_or_create(home / "identity.key").peer_id  # the key the kernel signed with
    assert snap_a["mesh"] == "lab" and snap_a["self"] != user
    assert [(p["name"], p["user"]) for p in snap_a["peers"]] == [("nb-a", user)]

    # A second notebook of the same user, through the panel's settings (URL, mesh, name).
    b.open_comm()
    b.next_data(is_snapshot(), "b's first snapshot")
    b.send({"request": "join", "url": url, "name": "nb-b", "mesh": "lab", "id": 2})
    assert b.next_data(is_reply("join"), "b's join reply")["ok"] is True
    two = b.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 2 and all(p.get("user") for p in s["peers"])),
                      "b sees both kernels")["snapshot"]
    ids = {p["name"]: p["id"] for p in two["peers"]}
    assert set(ids) == {"nb-a", "nb-b"} and len(set(ids.values())) == 2 and user not in ids.values()
    assert {p["user"] for p in two["peers"]} == {user}
    # a kept its id and its route: it sees b too, and each reaches the other by peer id.
    a.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 2), "a sees both kernels")
    for k, other in ((a, ids["nb-b"]), (b, ids["nb-a"])):
        k.execute("from gradient_nb.notebook.session import current as _cur\n"
                  f"_r = await _cur().mesh.call({other!r}, 'mesh.ping', timeout=20)")

    # Another peer (the CLI, its own throwaway key) lists both kernels under the user.
    status = subprocess.run([str(Path(sys.executable).parent / "gradient-nb"), "mesh", "status", url,
                             "--mesh", "lab", "--json"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    listed = {p["name"]: p for p in json.loads(status.stdout)["peers"]}
    assert {"nb-a", "nb-b"} <= set(listed)
    assert listed["nb-a"]["user"] == listed["nb-b"]["user"] == user

    b.send({"request": "leave", "id": 3})
    assert b.next_data(is_reply("leave"), "b's leave reply")["ok"] is True
    b.next_data(is_snapshot(lambda s: s.get("joined") is False), "b left")
    a.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 1), "a sees b gone")
    a.close_comm()
    b.close_comm()


def test_two_kernels_joined_by_the_magic_are_two_peers_of_one_user(kernels) -> None:
    # %mesh join too gives each kernel a key of its own, certified by the user's: before, both joined
    # with the user's key and the second took over the first's peer id.
    a, b, home = kernels
    a.open_comm()
    a.next_data(is_snapshot(), "a's first snapshot")
    a.execute("%mesh join --name mag-a --mesh lab")
    snap_a = a.next_data(is_snapshot(lambda s: s.get("joined") is True and any(p.get("user") for p in s["peers"])),
                         "a joined by the magic, with its certificate")["snapshot"]
    user = Identity.load_or_create(home / "identity.key").peer_id
    assert snap_a["self"] != user
    b.open_comm()
    b.next_data(is_snapshot(), "b's first snapshot")
    b.execute(f"%mesh join {snap_a['rendezvous']} --name mag-b --mesh lab")
    two = b.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 2 and all(p.get("user") for p in s["peers"])),
                      "b sees both kernels")["snapshot"]
    ids = {p["name"]: p["id"] for p in two["peers"]}
    assert set(ids) == {"mag-a", "mag-b"} and len(set(ids.values())) == 2 and user not in ids.values()
    assert {p["user"] for p in two["peers"]} == {user}
    a.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 2), "a keeps its id and sees b")
    a.close_comm()
    b.close_comm()
