"""The lab removes everything it built, whatever happens, and never touches what it did not build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradient_nb.testing import natlab
from gradient_nb.testing.natlab import SERVER, STATE_DIR, LabError, NatLab, cleanup_stale

pytestmark = pytest.mark.natlab


def lab_namespaces(token: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"{natlab.PREFIX}{token}-")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_teardown_after_a_failing_test_leaves_nothing() -> None:
    lab = NatLab({"x": "cone", "y": "symmetric"})
    with pytest.raises(RuntimeError, match="the test failed"), lab:
        sleeper = lab.spawn("x", ["sleep", "300"])
        # A process that starts its own child: the lab stops the whole session.
        shell = lab.spawn(SERVER, ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        grandchild = int(shell.stdout.readline())
        coturn = lab._coturn.pid
        workdir = lab.workdir
        assert sorted(lab_namespaces(lab.token)) == sorted(
            [lab.namespace(SERVER), lab.namespace("x"), lab.namespace("y"),
             f"{natlab.PREFIX}{lab.token}-r-x", f"{natlab.PREFIX}{lab.token}-r-y"])
        assert all(alive(p) for p in (sleeper.pid, grandchild, coturn))
        raise RuntimeError("the test failed")
    assert lab_namespaces(lab.token) == []
    assert not any(alive(p) for p in (sleeper.pid, shell.pid, grandchild, coturn))
    assert not workdir.exists()
    assert not (STATE_DIR / f"{lab.token}.json").exists()
    lab.down()  # a second teardown is harmless


def test_two_labs_side_by_side_have_distinct_names() -> None:
    with NatLab({"a": "public"}, turn=False) as one, NatLab({"a": "public"}, turn=False) as two:
        assert one.token != two.token
        assert one.namespace("a") != two.namespace("a")
        # Same addresses, separate namespaces: each lab is its own little Internet.
        for lab in (one, two):
            assert "198.51.100.11/24" in lab.run("a", ["ip", "-4", "-br", "addr"]).stdout


def test_stale_lab_of_a_dead_owner_is_cleaned_but_live_labs_are_not() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with NatLab({"a": "cone"}) as live:
        crashed = NatLab({"b": "symmetric"})
        crashed.up()
        coturn = crashed._coturn.pid
        # Pretend its owner crashed: the state file names a process that is gone.
        state_file = STATE_DIR / f"{crashed.token}.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "owner_pid": dead.pid}))
        removed = cleanup_stale()
        assert crashed.token in removed and live.token not in removed
        assert lab_namespaces(crashed.token) == []
        assert not alive(coturn)
        assert lab_namespaces(live.token) != []
        crashed._coturn.wait(timeout=5)
        crashed.down()


def test_cli_up_status_down() -> None:
    py = [sys.executable, "-m", "gradient_nb.testing.natlab"]
    up = subprocess.run([*py, "up", "--host", "a=cone", "--host", "b=udp-blocked"], capture_output=True,
                        text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    desc = json.loads(up.stdout)
    token = desc["token"]
    try:
        assert desc["hosts"]["b"]["nat"] == "udp-blocked"
        assert len(lab_namespaces(token)) == 5
        # It outlives the command that built it, and `status` reports it as not stale.
        status = json.loads(subprocess.run([*py, "status"], capture_output=True, text=True, check=True).stdout)
        mine = [lab for lab in status["labs"] if lab["token"] == token]
        assert mine and not mine[0]["stale"]
        assert token not in cleanup_stale()
    finally:
        down = subprocess.run([*py, "down", token], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(token) == []
    assert not Path(desc["ca_file"]).parent.exists()


def test_without_root_the_error_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        NatLab({"a": "cone"}).up()


def test_bad_host_names_and_types_are_refused() -> None:
    with pytest.raises(ValueError, match="NAT type"):
        NatLab({"a": "full-cone"})
    with pytest.raises(ValueError, match="host name"):
        NatLab({"server": "cone"})
