"""Throw-away multi-host networks built from Linux network namespaces, for tests.

``NetnsNetwork(k)`` gives ``k`` "hosts" (network namespaces) plugged into one Ethernet
switch.  The switch is a Linux bridge living in a namespace of its own, so building and
tearing the network down never touches the host's interfaces, routes or sysctls::

        host namespace (untouched)

        ┌─ gfl-XXXX-sw ──────────────────┐
        │ br0 (multicast snooping off)   │
        │  ├── p0 ═══ veth ═══ eth0 ─────┼─ gfl-XXXX-0   10.a.b.1/24
        │  ├── p1 ═══ veth ═══ eth0 ─────┼─ gfl-XXXX-1   10.a.b.2/24
        │  └── ...                       │
        └────────────────────────────────┘

Each host namespace has ``lo`` up, ``eth0`` up with its address, and a route for
224.0.0.0/4 on ``eth0`` so multicast (mDNS) leaves through the switch even though there is
no default route.  Names carry a random suffix, so parallel runs do not clash.

Usage::

    if (reason := netns_available()) is not None:
        pytest.skip(reason)
    with NetnsNetwork(4) as net:
        proc = net.run(0, [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        net.address(0)   # "10.a.b.1"

Leaving the ``with`` block (normally or by an exception) kills every process started with
``run`` (SIGTERM, then SIGKILL), then anything else still running inside the namespaces,
and deletes the namespaces; deleting a namespace destroys the veths and the bridge in it.
Everything needs root and iproute2; ``netns_available()`` says why not when it cannot work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

__all__ = ["NetnsError", "NetnsNetwork", "netns_available"]

_IP_TIMEOUT = 10.0  # seconds for any single `ip` command
_TERM_GRACE = 3.0  # seconds a process gets between SIGTERM and SIGKILL
_PREFIX = "gfl"


class NetnsError(RuntimeError):
    """Building or tearing down the namespace network failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one `ip` command; raise NetnsError with its stderr when it fails and check is set."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`ip {' '.join(args)}` could not run: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def netns_available() -> str | None:
    """Return why namespace tests cannot run here (a pytest skip reason), or None if they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` binary (iproute2) is not installed"
    probe = f"{_PREFIX}-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    except NetnsError as exc:
        return f"cannot create a bridge and veth pair in a namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class NetnsNetwork:
    """``k`` network namespaces on one bridged /24, with a way to run commands inside each."""

    def __init__(self, k: int, *, subnet: str | None = None) -> None:
        if not 1 <= k <= 250:
            raise ValueError(f"k must be between 1 and 250, got {k}")
        self.k = k
        suffix = secrets.token_hex(3)
        self.switch = f"{_PREFIX}-{suffix}-sw"
        self.names = [f"{_PREFIX}-{suffix}-{i}" for i in range(k)]
        if subnet is None:
            # A random 10.x.y.0/24: only ever visible inside our own namespaces.
            subnet = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
        self.subnet = subnet  # first three octets
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    # -- addressing --------------------------------------------------------------------------

    def address(self, i: int) -> str:
        """IPv4 address of host ``i`` on the shared segment."""
        self._check_index(i)
        return f"{self.subnet}.{i + 1}"

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.k:
            raise IndexError(f"namespace index {i} out of range 0..{self.k - 1}")

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        self._created.append(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        # No STP, no forwarding delay: ports forward as soon as they are up.  Multicast
        # snooping off: with it on, the bridge may drop mDNS until it has seen IGMP reports,
        # and nobody sends IGMP queries on this segment.
        _ip(*f"-n {sw} link add br0 type bridge stp_state 0 forward_delay 0".split())
        self._disable_snooping()
        self._disable_bridge_netfilter()
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            self._created.append(name)
            # Both ends are created straight into their namespaces: nothing appears in the
            # host namespace, so names cannot collide there.
            _ip(*f"-n {sw} link add p{i} type veth peer name eth0 netns {name}".split())
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def _disable_snooping(self) -> None:
        done = _ip(
            "-n",
            self.switch,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            check=False,
        )
        if done.returncode != 0:  # old iproute2: fall back on sysfs, as seen from inside
            self._exec_in_switch("echo 0 > /sys/class/net/br0/bridge/multicast_snooping")

    def _disable_bridge_netfilter(self) -> None:
        # Only matters when br_netfilter is loaded on the host: then bridged frames would go
        # through this namespace's (empty) iptables.  The sysctls are per-namespace; absent
        # when the module is not loaded, hence best effort.
        self._exec_in_switch(
            "for f in /proc/sys/net/bridge/bridge-nf-call-*; do "
            '[ -w "$f" ] && echo 0 > "$f"; done; true'
        )

    def _exec_in_switch(self, script: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.switch, "sh", "-c", script],
            capture_output=True,
            timeout=_IP_TIMEOUT,
            check=False,
        )

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``i``; it is killed when the network is closed."""
        self._check_index(i)
        if self._closed:
            raise NetnsError("the network is closed")
        # `ip netns exec` enters the namespace and execs argv, so the Popen's pid is argv's.
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill every process, delete every namespace.  Idempotent; collects all errors."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        errors: list[str] = []
        for name in reversed(self._created):
            _kill_namespace_pids(name)
            done = _ip("netns", "del", name, check=False)
            if done.returncode != 0:
                errors.append(f"{name}: {done.stderr.strip()}")
        self._created.clear()
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, wait a little, SIGKILL; reap it and close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=_TERM_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_namespace_pids(name: str) -> None:
    """SIGKILL whatever still runs in one of our namespaces (children of our children)."""
    done = _ip("netns", "pids", name, check=False)
    for token in done.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(token), signal.SIGKILL)
