"""A NAT lab on one machine: network namespaces, veth pairs, a bridge, iptables NATs and coturn.

Topology (addresses are TEST-NET-2, and exist only inside namespaces this module creates)::

    [server ns: br0 198.51.100.1, coturn STUN/TURN udp+tcp :3478, tls :5349, room for a rendezvous]
        |  bridge
        +-- public host       198.51.100.(10+i)       (no NAT)
        +-- router wan        198.51.100.(10+i) --NAT-- lan 10.i.0.1 -- host 10.i.0.2

Delay (``delay_ms``): every packet leaving a LAN (through its router, towards the public segment) is
held ``delay_ms`` by an NFQUEUE consumer in the router's namespace (``netdelay``): this kernel has no
``netem``. So a message between two NATed hosts, or from one to the server, takes ``delay_ms`` one way
more than on the bare lab; public hosts have no router and add none.

NAT types: ``public`` (no NAT), ``cone`` (MASQUERADE: endpoint-independent mapping while the port is
free, address+port dependent filtering through conntrack, i.e. a port-restricted cone), ``symmetric``
(MASQUERADE --random-fully: a new random port per destination) and ``udp-blocked`` (cone NAT whose
router forwards only TCP to the server; all other outbound traffic, UDP included, is dropped).

Every lab has a random token in the names of its namespaces (``gnblab-<token>-...``) and a state file
in ``/run/gradient-nb-natlab``; a lab whose owner process died is stale and is removed by the next
lab that starts (or ``python -m gradient_nb.testing.natlab down --stale``). Links are created
directly inside their namespaces, so nothing is left in the root namespace: deleting the
namespaces removes the veths and the bridge, and the processes inside are killed first.

By hand::

    python -m gradient_nb.testing.natlab up --host a=cone --host b=symmetric   # prints JSON, stays up
    ip netns exec gnblab-<token>-h-a python -m gradient_nb.testing.linkprobe ...
    python -m gradient_nb.testing.natlab status
    python -m gradient_nb.testing.natlab down <token>      # or --all
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..mesh.ice import IceConfig

NAT_TYPES = ("public", "cone", "symmetric", "udp-blocked")
SERVER = "server"  # the host name of the public segment's own namespace (coturn, rendezvous)
PREFIX = "gnblab-"
STATE_DIR = Path("/run/gradient-nb-natlab")
SERVER_IP = "198.51.100.1"
_PUBLIC_NET = ipaddress.ip_network("198.51.100.0/24")
TURN_PORT = 3478
TURNS_PORT = 5349
_NAME_RE = re.compile(r"^[a-z0-9]{1,24}$")


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which command failed and why."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: the NAT lab needs iproute2, iptables and coturn") from exc
    if check and cp.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({cp.returncode}): {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the comm field


def _ns_pids(ns: str) -> list[int]:
    cp = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split()] if cp.returncode == 0 else []


def _kill_ns_processes(ns: str, grace: float = 2.0) -> None:
    """Every process inside one of our namespaces was started there by a lab (the namespace name is
    unique to it), so stopping them all is stopping only what the lab started."""
    pids = _ns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _proc_start_time(p) is not None and not _is_zombie(p)]
        time.sleep(0.05)
    for pid in _ns_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _list_lab_namespaces() -> dict[str, list[str]]:
    cp = _run(["ip", "netns", "list"], check=False)
    by_token: dict[str, list[str]] = {}
    for line in cp.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            token = name[len(PREFIX):].split("-", 1)[0]
            by_token.setdefault(token, []).append(name)
    return by_token


def _read_state(token: str) -> dict[str, Any] | None:
    try:
        return json.loads((STATE_DIR / f"{token}.json").read_text())
    except (OSError, ValueError):
        return None


def _destroy(token: str, namespaces: Sequence[str] = (), remove_workdir: bool = True) -> list[str]:
    """Remove one lab: its processes, namespaces (with their veths, bridge and iptables), workdir and
    state file. Returns the errors met; it goes on past each one so that as much as possible is gone."""
    errors: list[str] = []
    state = _read_state(token) or {}
    names = set(namespaces) | set(state.get("namespaces", [])) | set(_list_lab_namespaces().get(token, []))
    for ns in sorted(names):
        try:
            _kill_ns_processes(ns)
        except Exception as exc:  # teardown must go on past each failure
            errors.append(f"{ns}: {exc}")
    for ns in sorted(names):
        cp = _run(["ip", "netns", "del", ns], check=False)
        if cp.returncode != 0 and "No such file" not in cp.stderr:
            errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
    wd = state.get("workdir")
    if remove_workdir and wd and Path(wd).name.startswith(PREFIX):
        shutil.rmtree(wd, ignore_errors=True)
    (STATE_DIR / f"{token}.json").unlink(missing_ok=True)
    return errors


def cleanup_stale() -> list[str]:
    """Remove labs whose owner process is gone (a crashed test run). Returns their tokens."""
    removed = []
    for token in set(_list_lab_namespaces()) | {p.stem for p in STATE_DIR.glob("*.json")}:
        state = _read_state(token)
        if state is not None and (state.get("persistent")
                                  or _proc_start_time(state["owner_pid"]) == state.get("owner_start")):
            continue
        if state is None and _young(token):
            continue  # a lab being built right now, its state file not written yet
        _destroy(token)
        removed.append(token)
    return removed


def _young(token: str) -> bool:
    marker = STATE_DIR / f"{token}.building"
    try:
        return time.time() - marker.stat().st_mtime < 60
    except OSError:
        return False


def _make_certs(workdir: Path, ip: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``ip`` (TURN over TLS verifies it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gradient-nb NAT lab test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = workdir / "ca.pem", workdir / "turn-cert.pem", workdir / "turn-key.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


# ``conntrack -F`` for IPv4: IPCTNL_MSG_CT_DELETE without a tuple flushes the table (ctnetlink).
_CONNTRACK_FLUSH = """
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
body = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg: family, NFNETLINK_V0, res_id
s.send(struct.pack("=IHHII", 16 + len(body), (1 << 8) | 2, 0x1 | 0x4, 1, 0) + body)  # CTNETLINK, CT_DELETE
err = struct.unpack_from("=i", s.recv(4096), 16)[0]
raise SystemExit(f"conntrack flush failed: errno {-err}" if err else 0)
"""


class NatLab:
    """Builds the lab on ``__enter__``/``up()`` and always removes all of it on ``__exit__``/``down()``.

    ``hosts`` maps a host name (``[a-z0-9]{1,24}``) to a NAT type from :data:`NAT_TYPES`. The host
    :data:`SERVER` is the public segment itself, where coturn runs.
    """

    def __init__(self, hosts: Mapping[str, str], *, turn: bool = True, turn_verbose: bool = False,
                 persistent: bool = False, keep_workdir: bool = False, delay_ms: float = 0.0) -> None:
        for name, nat in hosts.items():
            if not _NAME_RE.match(name) or name == SERVER:
                raise ValueError(f"bad host name {name!r}: [a-z0-9]{{1,24}}, not {SERVER!r}")
            if nat not in NAT_TYPES:
                raise ValueError(f"unknown NAT type {nat!r} for {name!r}; one of {NAT_TYPES}")
        if len(hosts) > 200:
            raise ValueError("at most 200 hosts")
        if not 0 <= delay_ms <= 10_000:
            raise ValueError(f"delay_ms must be in [0, 10000], not {delay_ms}")
        self.delay_ms = float(delay_ms)
        self.hosts = dict(hosts)
        self.token = secrets.token_hex(4)
        self.turn_enabled = turn
        self.turn_verbose = turn_verbose
        self.persistent = persistent
        self.keep_workdir = keep_workdir
        self.turn_username = "lab"
        self.turn_password = secrets.token_hex(8)
        self.turn_realm = "natlab.test"
        self.workdir: Path | None = None
        self.ca_file: Path | None = None
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._coturn: subprocess.Popen | None = None
        self._up = False

    # -- names and addresses -------------------------------------------------------------------

    @property
    def server_ip(self) -> str:
        """The public segment's own address: coturn listens here, and a rendezvous spawned on
        :data:`SERVER` can too."""
        return SERVER_IP

    def namespace(self, host: str) -> str:
        """The ``ip netns`` name of ``host`` (for ``ip netns exec`` by hand)."""
        if host == SERVER:
            return f"{PREFIX}{self.token}-pub"
        self._check_host(host)
        return f"{PREFIX}{self.token}-h-{host}"

    def _router_ns(self, host: str) -> str:
        return f"{PREFIX}{self.token}-r-{host}"

    def _index(self, host: str) -> int:
        return list(self.hosts).index(host) + 1

    def public_ip(self, host: str) -> str:
        """The address ``host`` has (or its NAT router has) on the public segment."""
        if host == SERVER:
            return SERVER_IP
        self._check_host(host)
        return str(_PUBLIC_NET.network_address + 10 + self._index(host))

    def address(self, host: str) -> str:
        """The address configured on ``host`` itself (private for hosts behind a NAT)."""
        if host == SERVER or self.hosts[host] == "public":
            return self.public_ip(host)
        return f"10.{self._index(host)}.0.2"

    def _check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this lab (hosts: {sorted(self.hosts)})")

    # -- ICE -----------------------------------------------------------------------------------

    def ice_config(self, host: str, *, turn_transport: str = "auto", stun: bool = True,
                   turn: bool = True) -> IceConfig:
        """STUN and TURN servers of the lab, for a peer on ``host``. ``turn_transport`` is ``"udp"``,
        ``"tcp"``, ``"tls"`` or ``"auto"`` (UDP first, with TCP and TLS as fallbacks that
        :meth:`IceConfig.resolved` chooses among)."""
        if host != SERVER:
            self._check_host(host)
        urls = {"udp": f"turn:{SERVER_IP}:{TURN_PORT}?transport=udp",
                "tcp": f"turn:{SERVER_IP}:{TURN_PORT}?transport=tcp",
                "tls": f"turns:{SERVER_IP}:{TURNS_PORT}?transport=tcp"}
        if turn_transport not in (*urls, "auto"):
            raise ValueError(f"turn_transport must be one of {[*urls, 'auto']}")
        use_turn = turn and self.turn_enabled
        first = "udp" if turn_transport == "auto" else turn_transport
        return IceConfig(
            stun=f"stun:{SERVER_IP}:{TURN_PORT}" if stun and self.turn_enabled else None,
            turn=urls[first] if use_turn else None,
            turn_username=self.turn_username if use_turn else None,
            turn_password=self.turn_password if use_turn else None,
            turn_fallbacks=(urls["tcp"], urls["tls"]) if use_turn and turn_transport == "auto" else (),
        )

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment :meth:`spawn` gives a process: ours, plus ``SSL_CERT_FILE`` naming the
        lab's CA (TURN over TLS verifies coturn's certificate), plus ``extra``."""
        env = dict(os.environ)
        if self.ca_file is not None:
            env["SSL_CERT_FILE"] = str(self.ca_file)
        env.update(extra or {})
        return env

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, host: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace. The process gets its own session (so that
        stopping it stops its children) and is stopped when the lab goes down."""
        if not self._up:
            raise LabError("the lab is not up")
        p = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], env=self.env(env),
                             start_new_session=True, **popen_kwargs)
        self._procs.append(p)
        return p

    def run(self, host: str, argv: Sequence[str], *, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace to completion and return its output."""
        p = self.spawn(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise LabError(f"{argv} in {host} failed ({p.returncode}): {err.strip()}")
        return cp

    @staticmethod
    def stop(p: subprocess.Popen, grace: float = 3.0) -> None:
        """Stop one spawned process and its session: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for stream in (p.stdout, p.stderr, p.stdin):
            if stream is not None:
                stream.close()

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> NatLab:
        self.up()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.down(raise_errors=exc_type is None)

    def up(self) -> NatLab:
        if self._up:
            return self
        if os.geteuid() != 0:
            raise LabError("the NAT lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN to create network "
                           f"namespaces, veths and iptables rules); running as uid {os.geteuid()}")
        for tool in ("ip", "iptables", *(["turnserver"] if self.turn_enabled else [])):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found on PATH: install iproute2, iptables and coturn")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        cleanup_stale()
        (STATE_DIR / f"{self.token}.building").touch()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.token}-"))
        try:
            self._write_state()
            self._build()
            self._up = True
            if self.delay_ms > 0:
                self._start_delays()
            if self.turn_enabled:
                self._start_coturn()
        except BaseException:
            self.down(raise_errors=False)
            raise
        finally:
            (STATE_DIR / f"{self.token}.building").unlink(missing_ok=True)
        return self

    def down(self, raise_errors: bool = True) -> None:
        """Stop the processes the lab started, then remove everything it built. Safe to call twice."""
        for p in reversed(self._procs):
            self.stop(p)
        if self._coturn is not None:
            self.stop(self._coturn)
        errors = _destroy(self.token, self._namespaces, remove_workdir=not self.keep_workdir)
        self._procs.clear()
        self._up = False
        if errors and raise_errors:
            raise LabError("NAT lab teardown incomplete: " + "; ".join(errors))

    def _write_state(self) -> None:
        state = {"token": self.token, "owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid()),
                 "persistent": self.persistent, "workdir": str(self.workdir), "namespaces": self._namespaces,
                 "hosts": self.hosts, "turn_username": self.turn_username, "turn_password": self.turn_password}
        tmp = STATE_DIR / f"{self.token}.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(STATE_DIR / f"{self.token}.json")

    def _add_ns(self, ns: str) -> None:
        cp = _run(["ip", "netns", "add", ns], check=False)
        if cp.returncode != 0:
            raise LabError(f"cannot create network namespace {ns}: {cp.stderr.strip()} (the NAT lab needs root "
                           "with CAP_SYS_ADMIN/CAP_NET_ADMIN and a kernel with network namespaces)")
        self._namespaces.append(ns)
        self._write_state()  # so that a crash from here on leaves a lab cleanup_stale can find
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _build(self) -> None:
        pub = self.namespace(SERVER)
        self._add_ns(pub)
        _run(["ip", "-n", pub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", pub, "addr", "add", f"{SERVER_IP}/24", "dev", "br0"])
        _run(["ip", "-n", pub, "link", "set", "br0", "up"])
        for host, nat in self.hosts.items():
            i = self._index(host)
            h = self.namespace(host)
            self._add_ns(h)
            edge = h if nat == "public" else self._router_ns(host)
            if edge != h:
                self._add_ns(edge)
            _run(["ip", "link", "add", "wan", "netns", edge, "type", "veth", "peer", "name", f"p{i}", "netns", pub])
            _run(["ip", "-n", pub, "link", "set", f"p{i}", "master", "br0", "up"])
            _run(["ip", "-n", edge, "addr", "add", f"{self.public_ip(host)}/24", "dev", "wan"])
            _run(["ip", "-n", edge, "link", "set", "wan", "up"])
            # Traffic to anything beyond the segment goes to the server namespace, which does not
            # forward: like a default route to an Internet that drops private destinations.
            _run(["ip", "-n", edge, "route", "add", "default", "via", SERVER_IP])
            if nat != "public":
                self._build_router(edge, h, i, nat)

    def _build_router(self, r: str, h: str, i: int, nat: str) -> None:
        _run(["ip", "link", "add", "lan", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", h])
        _run(["ip", "-n", r, "addr", "add", f"10.{i}.0.1/24", "dev", "lan"])
        _run(["ip", "-n", r, "link", "set", "lan", "up"])
        _run(["ip", "-n", h, "addr", "add", f"10.{i}.0.2/24", "dev", "eth0"])
        _run(["ip", "-n", h, "link", "set", "eth0", "up"])
        _run(["ip", "-n", h, "route", "add", "default", "via", f"10.{i}.0.1"])
        x = ["ip", "netns", "exec", r]
        _run([*x, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        ipt = [*x, "iptables", "-w", "5"]
        _run([*ipt, "-P", "FORWARD", "DROP"])
        _run([*ipt, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate",
              "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        if nat == "udp-blocked":
            # Only TCP to the server gets out (TURN over TCP/TLS, and a rendezvous there).
            _run([*ipt, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-p", "tcp", "-d", SERVER_IP, "-j", "ACCEPT"])
        else:
            _run([*ipt, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"])
        # Without this an unsolicited packet to the router itself leaves a conntrack entry for the
        # port, and a later hole punch from the inside is mapped to a different port (FACTS.md).
        _run([*ipt, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"])
        masq = [*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        _run([*masq, "--random-fully"] if nat == "symmetric" else masq)

    def _start_delays(self) -> None:
        """One ``netdelay`` consumer per router, holding what leaves its LAN (queue 0 of its namespace)."""
        for host, nat in self.hosts.items():
            if nat == "public":
                continue
            r = self._router_ns(host)
            p = subprocess.Popen(["ip", "netns", "exec", r, sys.executable, "-m", "gradient_nb.testing.netdelay",
                                  "--queue", "0", "--delay-ms", str(self.delay_ms)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            self._procs.append(p)
            ready = p.stdout.readline() if p.stdout is not None else ""
            if ready.strip() != "ready":
                err = p.stderr.read() if p.stderr is not None and p.poll() is not None else ""
                raise LabError(f"the delay queue in {r} did not start: {err.strip()[-1000:]}")
            _run(["ip", "netns", "exec", r, "iptables", "-w", "5", "-t", "mangle", "-A", "FORWARD", "-i", "lan",
                  "-o", "wan", "-j", "NFQUEUE", "--queue-num", "0"])

    def _start_coturn(self) -> None:
        assert self.workdir is not None
        self.ca_file, cert, key = _make_certs(self.workdir, SERVER_IP)
        log = self.workdir / "turnserver.log"
        argv = ["turnserver", "-n", "--no-cli", f"--listening-ip={SERVER_IP}", f"--relay-ip={SERVER_IP}",
                f"--listening-port={TURN_PORT}", f"--tls-listening-port={TURNS_PORT}",
                "--min-port=49152", "--max-port=65535", "--lt-cred-mech",
                f"--user={self.turn_username}:{self.turn_password}", f"--realm={self.turn_realm}",
                "--fingerprint", f"--cert={cert}", f"--pkey={key}", "--no-dtls",
                f"--pidfile={self.workdir / 'turnserver.pid'}", f"--db={self.workdir / 'turndb'}",
                f"--log-file={log}", "--simple-log", "--no-stdout-log"]
        if self.turn_verbose:
            argv.append("--verbose")
        self._coturn = subprocess.Popen(["ip", "netns", "exec", self.namespace(SERVER), *argv],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 15
        want = {f"{SERVER_IP}:{TURN_PORT}", f"{SERVER_IP}:{TURNS_PORT}"}
        while True:
            if self._coturn.poll() is not None:
                err = self._coturn.stderr.read().decode(errors="replace") if self._coturn.stderr else ""
                raise LabError(f"coturn exited ({self._coturn.returncode}): {err.strip()[-2000:]}")
            ss = _run(["ip", "netns", "exec", self.namespace(SERVER), "ss", "-Hltn"], check=False).stdout
            if all(w in ss for w in want):
                return
            if time.monotonic() > deadline:
                raise LabError(f"coturn did not listen on {sorted(want)} within 15 s; see {log}")
            time.sleep(0.1)

    def turn_log(self) -> str:
        """coturn's log so far (useful in a failed test's message)."""
        try:
            return (self.workdir / "turnserver.log").read_text(errors="replace") if self.workdir else ""
        except OSError:
            return ""

    def forget_mappings(self, host: str, *, ports: str = "1024-1999", protocols: Sequence[str] = ("udp",)) -> None:
        """``host``'s NAT forgets every mapping, as after a router reboot, and maps new flows of
        ``protocols`` to other public ports (``ports``): links through their old mappings are dead
        from then on (other flows are picked up again on the same port, as a NAT that preserves
        ports does). The flush is ``conntrack -F`` done with one ctnetlink message (the conntrack
        tool is not installed here); the new port range is a MASQUERADE rule put before the old one."""
        self._check_host(host)
        if self.hosts[host] == "public":
            raise LabError(f"{host} has no NAT")
        x = ["ip", "netns", "exec", self._router_ns(host)]
        for proto in protocols:
            _run([*x, "iptables", "-w", "5", "-t", "nat", "-I", "POSTROUTING", "1", "-o", "wan", "-p", proto,
                  "-j", "MASQUERADE", "--to-ports", ports])
        _run([*x, sys.executable, "-c", _CONNTRACK_FLUSH])

    def describe(self) -> dict[str, Any]:
        """Names, addresses and ICE settings of every host, as JSON-ready data."""
        return {
            "token": self.token, "delay_ms": self.delay_ms, "server": {"namespace": self.namespace(SERVER), "ip": SERVER_IP},
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "hosts": {h: {"nat": nat, "namespace": self.namespace(h), "address": self.address(h),
                          "public_ip": self.public_ip(h), "ice": self.ice_config(h, turn_transport="auto").to_dict()}
                      for h, nat in self.hosts.items()},
        }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradient_nb.testing.natlab", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab that stays up until `down`; prints its description")
    up.add_argument("--host", action="append", default=[], metavar="NAME=TYPE",
                    help=f"a host and its NAT type ({', '.join(NAT_TYPES)}); repeatable")
    up.add_argument("--no-turn", action="store_true", help="do not start coturn")
    up.add_argument("--turn-verbose", action="store_true", help="coturn -v (log in the lab's workdir)")
    down = sub.add_parser("down", help="remove a lab by token, all labs, or stale ones")
    down.add_argument("token", nargs="?")
    down.add_argument("--all", action="store_true")
    down.add_argument("--stale", action="store_true")
    sub.add_parser("status", help="list labs")
    args = ap.parse_args(argv)

    if args.cmd == "up":
        hosts = dict(h.split("=", 1) for h in args.host) if args.host else {"a": "cone", "b": "symmetric"}
        lab = NatLab(hosts, turn=not args.no_turn, turn_verbose=args.turn_verbose, persistent=True,
                     keep_workdir=True)
        lab.up()
        # coturn must outlive this command: it is in its own session and its pid sits in the
        # server namespace, where `down` finds it.
        lab._coturn = None
        print(json.dumps(lab.describe(), indent=1))
        return 0
    if args.cmd == "down":
        if args.stale:
            print(json.dumps({"removed": cleanup_stale()}))
            return 0
        tokens = sorted(set(_list_lab_namespaces()) | {p.stem for p in STATE_DIR.glob("*.json")}) \
            if args.all else [args.token] if args.token else []
        if not tokens:
            ap.error("down needs a token, --all or --stale")
        errors = {t: _destroy(t) for t in tokens}
        print(json.dumps({"removed": tokens, "errors": {t: e for t, e in errors.items() if e}}))
        return 1 if any(errors.values()) else 0
    labs = []
    for token, nss in sorted(_list_lab_namespaces().items()):
        state = _read_state(token) or {}
        alive = bool(state) and (state.get("persistent")
                                 or _proc_start_time(state["owner_pid"]) == state.get("owner_start"))
        labs.append({"token": token, "namespaces": sorted(nss), "hosts": state.get("hosts"),
                     "persistent": state.get("persistent"), "stale": not alive})
    print(json.dumps({"labs": labs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
