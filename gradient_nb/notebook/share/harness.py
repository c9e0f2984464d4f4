"""Real Jupyter servers (jupyter-collaboration) started as processes, a rendezvous process, and Python Yjs
clients that stand in for the users in each JupyterLab: the harness of the shared-notebook tests
(``tests/share/``) and of ``gradient-nb bench collab``. Not used by the bridge itself."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_ydoc import YNotebook
from pycrdt import Awareness, Map

from ...mesh.identity import Identity
from ...mesh.peer import join
from ...mesh.processes import spawn_owned, stop_processes
from .room import JupyterServer, RoomClient
from .yproto import AwarenessRelay, TaggedDoc

TOKEN = "share-test-token"
START_TIMEOUT_S = 60.0


@dataclass
class Server:
    root: Path
    url: str
    proc: subprocess.Popen
    runtime: Path  # its JUPYTER_RUNTIME_DIR, where it lists itself (jpserver-*.json)

    @property
    def jupyter(self) -> JupyterServer:
        return JupyterServer(self.url, TOKEN)

    @property
    def ystore(self) -> Path:
        return self.root / ".jupyter_ystore.db"

    def write(self, name: str, cells: list[str]) -> str:
        nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": secrets.token_hex(4),
                         "metadata": {}, "outputs": [], "source": src} for src in cells],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
              "nbformat": 4, "nbformat_minor": 5}
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_text(json.dumps(nb))
        return name


def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def start_server(root: Path, runtime: Path, ip: str = "127.0.0.1") -> Server:
    """A Jupyter server (with jupyter-collaboration) serving ``root`` on ``ip``; it ends with this process."""
    port = _free_port(ip)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    with open(_log_of(root), "wb") as log:
        # The YStore where jupyter-server-ydoc's default puts it when a lab is started in its root.
        proc = spawn_owned(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--ServerApp.ip={ip}",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={root}", f"--SQLiteYStore.db_path={root / '.jupyter_ystore.db'}"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
    return Server(root, f"http://{ip}:{port}/", proc, runtime)


def _log_of(root: Path) -> Path:
    return root.parent / f"{root.name}.log"


def wait_ready(server: Server, deadline: float) -> None:
    req = urllib.request.Request(server.url + "api/status", headers={"Authorization": f"token {TOKEN}"})
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the Jupyter server at {server.root} exited ({server.proc.returncode}): "
                               f"{_log_of(server.root).read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Jupyter server at {server.root} did not start: "
                               f"{_log_of(server.root).read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def start_rendezvous() -> tuple[subprocess.Popen, str]:
    """A ``gradient-nb rendezvous`` process on this host (any free port); returns it and its URL.
    Stop it with ``stop_processes([proc])``."""
    p = spawn_owned([sys.executable, "-m", "gradient_nb.cli", "rendezvous", "--port", "0"],
                    stderr=subprocess.DEVNULL)
    line = p.stdout.readline()  # type: ignore[union-attr]
    if not line:
        stop_processes([p])
        raise RuntimeError("the rendezvous did not start")
    return p, json.loads(line)["url"]


async def join_peer(url: str, name: str, **kw: Any) -> Any:
    return await join(url, name=name, identity=Identity.generate(), heartbeat=0.5, peer_timeout=3.0,
                      probe_seconds=0.05, **kw)


class User:
    """A user in one JupyterLab: a Yjs client of the notebook's room, with a presence."""

    def __init__(self, server: Server | JupyterServer, path: str, name: str) -> None:
        self.doc = TaggedDoc()
        self.seen = AwarenessRelay()  # presences this user's lab shows
        jupyter = server.jupyter if isinstance(server, Server) else server
        self.room = RoomClient(jupyter, path, self.doc, on_awareness=self._on_awareness)
        self.nb = YNotebook(self.doc.doc)
        self.name = name
        self.awareness = Awareness(self.doc.doc)

    def _on_awareness(self, update: bytes) -> None:
        self.seen.news(update)

    async def __aenter__(self) -> User:
        await self.room.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.room.close()

    def announce(self) -> None:
        """Publish (again: the clock moves) this user's presence, as JupyterLab does every few seconds."""
        self.awareness.set_local_state({"user": {"name": self.name, "username": self.name}})
        self.room.send_awareness(self.awareness.encode_awareness_update([self.doc.doc.client_id]))

    def names_seen(self) -> set[str]:
        return {s.get("user", {}).get("name") for s in self.seen.users() if isinstance(s, dict)}

    def sources(self) -> list[str]:
        return [c["source"] for c in self.nb.get()["cells"]]

    def cell_ids(self) -> list[str]:
        return [c["id"] for c in self.nb.get(deduplicate=False)["cells"]]

    def add_cell(self, source: str, index: int | None = None) -> None:
        cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source,
                "id": secrets.token_hex(4)}
        if index is None:
            self.nb.append_cell(cell)
        else:
            self.nb.ycells.insert(index, self.nb.create_ycell(cell))

    def write_output(self, index: int, text: str) -> None:
        """What a kernel's output does to the document: a stream output appended to the cell."""
        self.nb.ycells[index]["outputs"].append(Map({"output_type": "stream", "name": "stdout", "text": text}))

    def outputs(self, index: int) -> list[Any]:
        return self.nb.get()["cells"][index]["outputs"]

    def type_into(self, index: int, text: str, at: int | None = None) -> None:
        src = self.nb.ycells[index]["source"]
        src.insert(len(src) if at is None else at, text)


async def eventually(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check()`` until it is truthy, or fail after ``timeout`` seconds (never assert a time)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")
