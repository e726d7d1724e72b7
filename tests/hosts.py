"""Separate hosts on one machine, for tests of what crosses a network: each host a network namespace
with its own address on a private bridge, and, for every process it runs, its own host name (resolving to
its address, as on a machine: Gloo and lorag's ingest lock go by it) and a mount namespace in which the
driver's project, its temp files and $HOME are gone.

What a host sees is what a container image would give it: the Python installation and the project's
virtual environment (read-only), lorag's installed package (`platform/`, read-only), and its own
`/tmp` (a directory of the test's, so the test can look at what the host wrote there: its Ray
session, its LORAG_CACHE). Everything else reaches it through the network: Ray, storage URIs, Milvus.

    with Hosts(2, workdir) as hosts:
        a, b = hosts
        a.start(["ray", "start", "--head", ...], env)   # runs in a's namespaces
        hosts.bridge                                      # the driver's address on the bridge (servers for the hosts)

Needs root (ip netns, unshare --mount). Every process started on a host is killed and every namespace,
link and mount removed when the block ends, also on failure; `Host.kill` kills every process of one
host at once (a machine lost), `Host.cut`/`Host.mend` take its link down and up (a network cut).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The hiding is done by this script, in the new mount namespace, before the host's command starts:
# paths to keep are bind-mounted read-only aside, /tmp becomes the host's own directory, $HOME and
# the project become empty tmpfs, and the kept paths are moved back where they were.
_MOUNTS = r"""
set -e
mount --make-rprivate /
mount -t tmpfs lorag-host-keep /mnt
i=0
for p in $LORAG_HOST_KEEP; do
  mkdir /mnt/k$i; mount --bind "$p" /mnt/k$i; mount -o remount,bind,ro /mnt/k$i; i=$((i+1))
done
mount --bind "$LORAG_HOST_ETC_HOSTS" /etc/hosts
hostname "$LORAG_HOST_NAME"
mount --bind "$LORAG_HOST_TMP" /tmp
for p in $LORAG_HOST_HIDE; do
  if [ -d "$p" ]; then mount -t tmpfs lorag-host-hidden "$p"; fi
done
i=0
for p in $LORAG_HOST_KEEP; do
  mkdir -p "$p"; mount --move /mnt/k$i "$p"; i=$((i+1))
done
unset LORAG_HOST_KEEP LORAG_HOST_HIDE LORAG_HOST_TMP LORAG_HOST_ETC_HOSTS LORAG_HOST_NAME
exec "$@"
"""


def available() -> str | None:
    """Why hosts cannot be made here (None: they can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network and mount namespaces need root on Linux"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Host:
    """One host: a network namespace with address `ip`, and `tmp`, the directory it sees as /tmp."""

    def __init__(self, name: str, ns: str, ip: str, link: str, tmp: Path):
        self.name, self.ns, self.ip, self.link, self.tmp = name, ns, ip, link, tmp
        self.hostname = f"lorag-host-{name}"  # its own (UTS namespace), resolving to its own address, as a machine's does
        self.etc_hosts = tmp.parent / "hosts"
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
        """Run `cmd` on this host (its network, its view of the disk); stdout and stderr to `log`."""
        argv, full_env = self._wrap(cmd, env)
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `cmd` on this host to its end; its output returned."""
        argv, full_env = self._wrap(cmd, env)
        return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout)

    def _wrap(self, cmd: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        keep = [sys.prefix, sys.base_prefix, str(REPO / "platform")]
        hide = [str(REPO), os.path.expanduser("~"), env.get("HOME", "/root")]
        mounts = {"LORAG_HOST_KEEP": " ".join(dict.fromkeys(keep)), "LORAG_HOST_HIDE": " ".join(dict.fromkeys(hide)), "LORAG_HOST_TMP": str(self.tmp),
                  "LORAG_HOST_ETC_HOSTS": str(self.etc_hosts), "LORAG_HOST_NAME": self.hostname}
        argv = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", _MOUNTS, "host", *cmd]
        return argv, {**env, **mounts}

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (whatever started it)."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> int:
        """Kill every process of this host at once (SIGKILL), as a machine that disappears; returns how many."""
        killed = 0
        for _ in range(20):  # children forked while we kill: until none is left
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        return killed

    def cut(self) -> None:
        """Take the host's link down: its processes live on, unreachable (a network cut)."""
        _ip("link", "set", self.link, "down")

    def mend(self) -> None:
        _ip("link", "set", self.link, "up")


class Hosts:
    """N hosts on a private bridge (10.231.<k>.0/24); the driver is `bridge` (.1), the hosts .10, .11, ...

    Args:
        n: how many hosts.
        workdir: where each host's /tmp lives on the driver's disk (`<workdir>/<name>/tmp`).
    """

    def __init__(self, n: int, workdir: Path):
        tag = f"{os.getpid() % 100000}"
        self.subnet = 1 + os.getpid() % 250
        self.bridge = f"10.231.{self.subnet}.1"
        self.bridge_link = f"lrgbr{tag}"[:15]
        self.hosts = [
            Host(chr(ord("a") + i), f"lorag-{tag}-{chr(ord('a') + i)}", f"10.231.{self.subnet}.{10 + i}", f"lrg{tag}{chr(ord('a') + i)}"[:15],
                 Path(workdir) / chr(ord("a") + i) / "tmp")
            for i in range(n)
        ]

    def __enter__(self) -> "Hosts":
        try:
            _ip("link", "add", self.bridge_link, "type", "bridge")
            _ip("addr", "add", f"{self.bridge}/24", "dev", self.bridge_link)
            _ip("link", "set", self.bridge_link, "up")
            names = "".join(f"{h.ip} {h.hostname}\n" for h in self.hosts)
            for h in self.hosts:
                h.tmp.mkdir(parents=True, exist_ok=True)
                h.etc_hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
                _ip("netns", "add", h.ns)
                _ip("link", "add", h.link, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
                _ip("link", "set", h.link, "master", self.bridge_link, "up")
                _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                _ip("-n", h.ns, "link", "set", "eth0", "up")
                _ip("-n", h.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def close(self) -> None:
        """Kill every host's processes, then remove namespaces, links and the bridge (whatever exists)."""
        for h in self.hosts:
            if _ip("netns", "list", check=False).stdout.find(h.ns) >= 0:
                h.kill()
                _ip("netns", "del", h.ns, check=False)
            _ip("link", "del", h.link, check=False)
        _ip("link", "del", self.bridge_link, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of these hosts that still exist (empty after `close`)."""
        names = _ip("netns", "list", check=False).stdout + _ip("link", "show", check=False).stdout
        return [x for x in [self.bridge_link, *(h.ns for h in self.hosts), *(h.link for h in self.hosts)] if x in names]
