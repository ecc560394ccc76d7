"""Stages on separate network stacks (Linux network namespaces; needs root), as on several hosts.

Each stage gets a namespace joined to this one by a veth pair, and this namespace routes between
them: the coordinator (here) reaches every stage directly, while stage-to-stage traffic crosses
the router. ``cut(i)`` stops forwarding what stage i sends, which breaks its links to the other
stages and nothing else: a partition the coordinator's heartbeats cannot see.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def available() -> bool:
    if os.geteuid() != 0 or not _FORWARD.exists():
        return False
    probe = f"mprobe{os.getpid() % 100000}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    """``n`` namespaces ``hosts[i]`` at address ``addresses[i]``, routed through this one."""

    def __init__(self, n: int):
        tag = os.getpid() % 10000
        net = 100 + os.getpid() % 100
        self.names = [f"mesh{tag}-{i}" for i in range(n)]
        self._host_if = [f"m{tag}h{i}" for i in range(n)]
        self.addresses = [f"10.{net}.{i}.2" for i in range(n)]
        self._gateways = [f"10.{net}.{i}.1" for i in range(n)]
        self._forward_was = _FORWARD.read_text().strip()

    @property
    def gateways(self) -> list[str]:
        """This namespace's address as host ``i`` reaches it (where a coordinator listens)."""
        return list(self._gateways)

    @property
    def wrappers(self) -> list[list[str]]:
        return [["ip", "netns", "exec", name] for name in self.names]

    def __enter__(self) -> Hosts:
        try:
            for name, host_if, addr, gw in zip(self.names, self._host_if, self.addresses,
                                               self._gateways, strict=True):
                peer_if = host_if.replace("h", "n", 1)
                _ip("netns", "add", name)
                _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
                _ip("link", "set", peer_if, "netns", name)
                _ip("addr", "add", f"{gw}/24", "dev", host_if)
                _ip("link", "set", host_if, "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", peer_if)
                _ip("-n", name, "link", "set", peer_if, "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "route", "add", "default", "via", gw)
            _FORWARD.write_text("1")
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self, i: int, cut: bool = True) -> None:
        """Stop (or resume) forwarding what stage ``i`` sends to the other stages."""
        Path(f"/proc/sys/net/ipv4/conf/{self._host_if[i]}/forwarding").write_text(
            "0" if cut else "1")

    def __exit__(self, *exc) -> None:
        for name, host_if in zip(self.names, self._host_if, strict=True):
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        _FORWARD.write_text(self._forward_was)
