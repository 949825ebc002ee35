"""Two real hosts on this machine for the multi-node tests: network namespaces joined by a bridge.

Each host is a network namespace with its own veth interface `eth0`, its own address in a private /24 and its
own loopback; processes started on a host also get their own hostname (a UTS namespace). The addresses exist only
inside the namespaces made here, the bridge has none, so traffic stays between them. Everything is removed by
`close()` (also after a failure): every process in a host's namespace is killed by PID (`ip netns pids`, which
lists only processes inside it), then the namespaces and the bridge are deleted.

Needs root and iproute2 (`ip`) and util-linux (`unshare`, `nsenter`); `missing_requirements()` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class HostsError(RuntimeError):
    """The hosts cannot be made here; the message says why."""


def missing_requirements() -> str | None:
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"two-host fixture: {', '.join(missing)} not found (Debian packages iproute2, util-linux)"
    if os.geteuid() != 0:
        return "two-host fixture: must run as root (network namespaces)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


class Hosts:
    """`names` hosts (h1, h2 by default) on one bridge; `addr(name)`, `popen(name, cmd)`, `kill_host(name)`."""

    _made_count = 0

    def __init__(self, names: Sequence[str] = ("h1", "h2")) -> None:
        self.names = list(names)
        # Names unique per process and instance (interface names have at most 15 characters).
        Hosts._made_count += 1
        tag = f"{os.getpid() % 10000:04d}{Hosts._made_count % 10}"
        # A /24 per pytest process: 10.(200 + pid / 250 mod 50).(pid mod 250).0, private and unlikely to be in use.
        pid = os.getpid()
        self.prefix = f"10.{200 + (pid // 250) % 50}.{pid % 250}"
        self.bridge = f"cgbr{tag}"
        self.ns = {name: f"cg{tag}{name}" for name in self.names}
        self._veth = {name: f"cgv{tag}{i}" for i, name in enumerate(self.names)}
        self._procs: list[subprocess.Popen] = []
        self._made: list[tuple[str, str]] = []

    def addr(self, name: str) -> str:
        return f"{self.prefix}.{self.names.index(name) + 1}"

    def start(self) -> Hosts:
        self._tmp = tempfile.TemporaryDirectory(prefix="hosts-")
        self._hosts_file = Path(self._tmp.name) / "hosts"
        self._hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{self.addr(n)} {n}\n" for n in self.names))
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("link", "set", self.bridge, "up")
            for name in self.names:
                ns, veth = self.ns[name], self._veth[name]
                _ip("netns", "add", ns)
                self._made.append(("netns", ns))
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._made.append(("link", veth))
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def command(self, name: str, cmd: Sequence[str]) -> list[str]:
        """`cmd` as run on host `name`: in its network namespace, with its own hostname, and an /etc/hosts that
        names every host (a private mount namespace: the machine's own /etc/hosts is untouched), as a cluster's
        DNS would."""
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup hierarchy slurmd needs.
        return ["nsenter", f"--net=/run/netns/{self.ns[name]}", "unshare", "--uts", "--mount", "--propagation",
                "private",
                "--", "sh", "-c", f'mount --bind {self._hosts_file} /etc/hosts && hostname {name} && exec "$@"',
                "sh", *cmd]

    def popen(self, name: str, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(name, cmd), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, name: str, cmd: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(name, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_host(name)
            out, err = proc.communicate()
            raise AssertionError(f"timed out on {name} after {timeout:.0f} s: {err[-3000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def pids(self, name: str) -> list[int]:
        """Every process inside host `name`'s network namespace."""
        out = _ip("netns", "pids", self.ns[name], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to every process of host `name` (as a machine that dies); returns how many there were."""
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def interface_down(self, name: str) -> None:
        """Take host `name`'s network interface down: its peers see silence, not a closed connection."""
        _ip("-n", self.ns[name], "link", "set", "eth0", "down")

    def close(self) -> None:
        for name in self.names:
            if ("netns", self.ns[name]) in self._made:
                self.kill_host(name)
        deadline = time.monotonic() + 10
        while any(self.pids(n) for n in self.names if ("netns", self.ns[n]) in self._made):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for kind, what in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", what, check=False)
            else:
                _ip("link", "del", what, check=False)
        self._made.clear()
        if getattr(self, "_tmp", None):
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

