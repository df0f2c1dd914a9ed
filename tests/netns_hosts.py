"""Several "hosts" on one machine: Linux network namespaces on a bridge, for multi-host tests.

Each host is a network namespace with one veth interface named eth0, joined to
a bridge in the root namespace; the addresses (SUBNET.1 on the bridge,
SUBNET.11, .12, ... on the hosts) are created here and removed by `down`.
The filesystem is shared, as on a cluster with a shared home. Traffic stays
on these interfaces. Needs root and iproute2 + util-linux (nsenter).

Processes enter a host with `nsenter --net=...`, not `ip netns exec`: the
latter remounts /sys, which breaks slurmd's cgroup setup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def missing() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install iproute2 util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Hosts:
    """`names` hosts as namespaces `<prefix><i>` on bridge `bridge`, addresses `subnet`.1x."""

    names: tuple[str, ...]
    subnet: str  # e.g. "10.99.1": a /24 no other test uses
    bridge: str
    prefix: str

    def netns(self, name: str) -> str:
        return f"{self.prefix}{self.names.index(name) + 1}"

    def addr(self, name: str) -> str:
        return f"{self.subnet}.{11 + self.names.index(name)}"

    def enter(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run inside host `name`'s network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns(name)}", *argv]

    def up(self) -> Hosts:
        self.down()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names, 1):
            ns, veth = self.netns(name), f"{self.prefix}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        for name in self.names:
            _ip("netns", "del", self.netns(name), check=False)
        _ip("link", "del", self.bridge, check=False)
