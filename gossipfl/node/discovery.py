"""Find the other nodes of a cluster on the local network with mDNS / DNS-SD (zeroconf).

Every node advertises one service instance of type ``_gossipfl._tcp.local.``:

- SRV: a host name of its own (``<instance>.local.``) and the node's HTTP port;
- A: the addresses to reach it (by default every non-loopback IPv4 of the host);
- TXT: ``id`` (the node id, verbatim), ``cluster``, ``proto`` (protocol version),
  ``fp`` (model fingerprint) and ``boot`` (a random token drawn at each start, so that a
  node restarted after a crash is seen as *updated* even when nothing else changed).

The instance name is derived from the id and the cluster (sanitised id, truncated, plus a
hash of both), so it is a valid DNS label, unique per (cluster, id) and stable across
restarts. The real id only travels in TXT.

Each node browses the same type, resolves every instance it hears of (asynchronously, with
a timeout, never blocking the event loop zeroconf runs on) and keeps those of its cluster,
protocol version and fingerprint. The others are ignored with one log line each.

Lifecycle::

    async with Discovery(node_id="a", cluster="lab", port=8000, fingerprint=fp,
                         on_change=lambda view: ...) as disco:
        disco.peers()        # {"b": PeerInfo(...), ...}, never ourselves
        disco.forget("b")    # b unreachable for too long: out of the view until
                             # zeroconf hears of it again

Leaving the block (or ``aclose()``) sends goodbye packets so the other nodes drop this one
at once. A node killed without them stays in the others' views until they ``forget`` it (the
node does so when the peer stops answering), or else until its PTR record expires from their
caches: zeroconf keeps a received PTR at least 1125 s (~19 min), whatever TTL was sent.

Network facts worth knowing (see also the README, "Run on several machines"):

- mDNS is UDP multicast to 224.0.0.251:5353 on the local segment only: every node must be
  on one L2 segment (or behind an mDNS reflector), and UDP 5353 open in the firewall. A
  host without a default route needs a route for 224.0.0.0/4 on the interface
  (``ip route add 224.0.0.0/4 dev eth0``); switches with IGMP snooping and no querier may
  drop the traffic.
- ``interfaces`` limits mDNS to the given addresses' interfaces (``["127.0.0.1"]`` works
  for several nodes on one host, loopback only); ``addresses`` is what is advertised.
- Questions ask for multicast answers (``QUESTION_TYPE``), because with several mDNS stacks
  on one host a unicast answer reaches only one of them. The name-conflict probe that
  refuses a second live node with our id still relies on unicast answers, so it is
  reliable across hosts but only best-effort between processes on one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import ifaddr
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossipfl.errors import ConfigError, WireError

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Discovery",
    "PeerInfo",
    "browse",
    "build_txt",
    "incompatibility",
    "instance_label",
    "on_link_first",
    "parse_advert",
]

SERVICE_TYPE = "_gossipfl._tcp.local."
PROTOCOL_VERSION = 1

# Timing constants, in one place.
RESOLVE_TIMEOUT = 3.0  # seconds to resolve one advertised instance (SRV, TXT, A)
RECORD_TTL = 120  # seconds our SRV/TXT/A records live in others' caches (PTR: >= 1125, see above)
FORGET_RECHECK = 30.0  # seconds after forget() before we ask for the peer again
FORGET_RECHECK_MAX = 600.0  # the interval doubles up to this
BROWSE_SETTLE = 1.0  # seconds browse() waits for resolutions still running after `duration`

# Ask for multicast answers (QM), never unicast ones (QU): when several mDNS stacks share a
# host (several nodes, avahi) they all bind UDP 5353 with SO_REUSEPORT and the kernel hands
# a unicast answer to just one of them, often not the one that asked.
QUESTION_TYPE = DNSQuestionType.QM

_MAX_FIELD_BYTES = 200  # a TXT string is at most 255 bytes, "key=" included
_LABEL_ID_CHARS = 40  # readable part of the instance name; the label stays well under 63
_HASH_CHARS = 8

_UNSAFE_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_DECIMAL = re.compile(r"[0-9]{1,9}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerInfo:
    """One other node as advertised on the network."""

    id: str
    cluster: str
    version: int  # protocol version
    fingerprint: str
    host: str  # mDNS host name from the SRV record, e.g. "node-1-1a2b3c4d.local."
    port: int
    addresses: tuple[str, ...]

    @property
    def address(self) -> str:
        """``host:port`` to reach the node: its first usable IPv4 address.

        Usable means not unspecified or multicast; a loopback or link-local address is taken
        only when nothing better is advertised. Falls back on IPv6 (``[addr]:port``), then on
        the mDNS host name.
        """
        best: tuple[int, str] | None = None
        for text in self.addresses:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_unspecified or ip.is_multicast:
                continue
            if ip.version == 4:
                rank, where = (1 if ip.is_loopback or ip.is_link_local else 0), f"{ip}:{self.port}"
            else:
                rank, where = 2, f"[{ip}]:{self.port}"
            if rank == 0:
                return where
            if best is None or rank < best[0]:
                best = (rank, where)
        if best is not None:
            return best[1]
        return f"{self.host.rstrip('.')}:{self.port}"


ChangeCallback = Callable[[dict[str, PeerInfo]], None]


# -- advert building, parsing and filtering (pure functions) ---------------------------------


def instance_label(node_id: str, cluster: str) -> str:
    """A valid, unique, stable DNS-SD instance label for a node id (which may be anything)."""
    readable = _UNSAFE_LABEL_CHARS.sub("-", node_id).strip("-")[:_LABEL_ID_CHARS].strip("-")
    digest = hashlib.sha256(f"{cluster}\0{node_id}".encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable or 'node'}-{digest}"


def build_txt(*, node_id: str, cluster: str, protocol_version: int, fingerprint: str, boot: str = "") -> dict[str, str]:
    """TXT properties a node advertises."""
    txt = {"id": node_id, "cluster": cluster, "proto": str(protocol_version), "fp": fingerprint}
    if boot:
        txt["boot"] = boot
    return txt


def _txt_text(properties: Mapping[bytes, bytes | None], key: str) -> str:
    raw = properties.get(key.encode())
    if raw is None:
        raise WireError(f"TXT key {key!r} missing")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"TXT key {key!r} is not UTF-8") from None
    if not text:
        raise WireError(f"TXT key {key!r} is empty")
    return text


def parse_advert(
    properties: Mapping[bytes, bytes | None],
    *,
    host: str | None,
    port: int | None,
    addresses: Sequence[str],
) -> PeerInfo:
    """Build a PeerInfo from a resolved advert; WireError naming the fault if it is malformed."""
    node_id = _txt_text(properties, "id")
    cluster = _txt_text(properties, "cluster")
    fingerprint = _txt_text(properties, "fp")
    proto = _txt_text(properties, "proto")
    if not _DECIMAL.fullmatch(proto):
        raise WireError(f"TXT key 'proto' is not a protocol version: {proto!r}")
    if type(port) is not int or not 1 <= port <= 65535:
        raise WireError(f"port {port!r} is not in 1..65535")
    valid: list[str] = []
    for text in addresses:
        try:
            valid.append(str(ipaddress.ip_address(text)))
        except ValueError:
            continue
    if not valid:
        raise WireError("no address advertised")
    return PeerInfo(
        id=node_id,
        cluster=cluster,
        version=int(proto),
        fingerprint=fingerprint,
        host=host or "",
        port=port,
        addresses=tuple(valid),
    )


def incompatibility(peer: PeerInfo, *, cluster: str, protocol_version: int, fingerprint: str) -> str | None:
    """Why we cannot gossip with ``peer`` (a short sentence), or None if we can."""
    if peer.cluster != cluster:
        return f"is in cluster {peer.cluster!r}, not {cluster!r}"
    if peer.version != protocol_version:
        return f"speaks protocol version {peer.version}, not {protocol_version}"
    if peer.fingerprint != fingerprint:
        return f"has model fingerprint {peer.fingerprint!r}, not {fingerprint!r}"
    return None


def on_link_first(peer: PeerInfo, networks: Sequence[ipaddress.IPv4Network]) -> PeerInfo:
    """``peer`` with its addresses on one of ``networks`` (our own subnets) moved first.

    A multi-homed peer advertises every address it has (a docker bridge, a VPN, ...), and
    ``PeerInfo.address`` takes the first usable one: make it one we share a subnet with.
    """

    def off_link(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        return not (ip.version == 4 and any(ip in net for net in networks))

    ordered = tuple(sorted(peer.addresses, key=off_link))  # stable: keeps the advertised order
    return peer if ordered == peer.addresses else dataclasses.replace(peer, addresses=ordered)


# -- the peer table: browse events in, filtered view out -------------------------------------

# check(peer) -> None to accept, or (log level, reason) to ignore it.
_Check = Callable[[PeerInfo], tuple[int, str] | None]


class _PeerTable:
    """Resolve the instances a browser reports, keep those ``check`` accepts, publish changes.

    Runs entirely in the event loop zeroconf is attached to. Each resolution is a task kept
    in ``_resolving`` (one per instance name, a newer event cancels the older task) and
    cancelled on ``aclose()``.
    """

    def __init__(
        self,
        *,
        check: _Check,
        own_name: str | None,
        on_change: ChangeCallback | None,
        logger: logging.Logger,
        networks: Callable[[], Sequence[ipaddress.IPv4Network]] = list,
    ) -> None:
        self._check = check
        self._networks = networks
        self._own_key = own_name.lower() if own_name else None
        self._on_change = on_change
        self._log = logger
        self._zc: Zeroconf | None = None
        self._by_name: dict[str, PeerInfo] = {}  # instance name -> accepted peer, oldest first
        self._ignored: dict[str, str] = {}  # instance name -> reason already logged
        self._resolving: dict[str, asyncio.Task[None]] = {}  # resolution or recheck, by name
        self._recheck_delay: dict[str, float] = {}  # forgotten name -> next first delay
        self._view: dict[str, PeerInfo] = {}
        self._closed = False

    # views

    def view(self) -> dict[str, PeerInfo]:
        """Accepted peers by id (if two instances claim one id, the last resolved wins)."""
        return dict(self._view)

    def resolved(self) -> list[PeerInfo]:
        """Every accepted instance, ids possibly repeated (browse() across clusters)."""
        return list(self._by_name.values())

    async def settle(self) -> None:
        """Wait until no resolution is running (bound it with a timeout)."""
        while self._resolving:
            await asyncio.wait(list(self._resolving.values()))

    # events from the browser (called in the loop by zeroconf, keyword arguments)

    def attach(self, zc: Zeroconf) -> None:
        self._zc = zc

    def on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._closed or service_type != SERVICE_TYPE or name.lower() == self._own_key:
            return
        if state_change is ServiceStateChange.Removed:
            self._cancel_resolve(name)
            self._ignored.pop(name, None)
            self._recheck_delay.pop(name, None)
            self.drop(name)
        else:  # Added or Updated: (re)resolve; this also brings back a forgotten peer
            self._schedule_resolve(zeroconf, name)

    def _schedule_resolve(self, zc: Zeroconf, name: str) -> None:
        self._start_task(name, self._resolve(zc, name))

    def _start_task(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run coro as the one task for instance ``name``, cancelling the previous one."""
        self._cancel_resolve(name)
        task = asyncio.get_running_loop().create_task(coro, name=f"gossipfl-discovery {name}")
        self._resolving[name] = task
        task.add_done_callback(self._resolve_done)

    def _cancel_resolve(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()

    def _resolve_done(self, task: asyncio.Task[None]) -> None:
        for name, current in list(self._resolving.items()):
            if current is task:
                del self._resolving[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("discovery: resolving a peer failed", exc_info=exc)

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc, RESOLVE_TIMEOUT * 1000, question_type=QUESTION_TYPE):
            self._log.debug("discovery: %s did not resolve within %.1f s", name, RESOLVE_TIMEOUT)
            return
        self.update_from_info(name, info)

    # table updates (also the entry points of the unit tests)

    def update_from_info(self, name: str, info: ServiceInfo) -> None:
        """Parse, check and store one resolved instance."""
        try:
            peer = parse_advert(info.properties, host=info.server, port=info.port, addresses=info.parsed_addresses())
        except WireError as exc:
            self._ignore(name, logging.WARNING, f"malformed advert ({exc})")
            return
        peer = on_link_first(peer, self._networks())
        verdict = self._check(peer)
        if verdict is not None:
            level, reason = verdict
            self._ignore(name, level, f"peer {peer.id!r} {reason}")
            return
        self._ignored.pop(name, None)
        self._by_name.pop(name, None)
        self._by_name[name] = peer  # re-insert: the newest resolution wins an id clash
        self._publish()

    def _ignore(self, name: str, level: int, reason: str) -> None:
        if self._ignored.get(name) != reason:  # once per instance and reason, not per refresh
            self._ignored[name] = reason
            self._log.log(level, "discovery: ignoring %s: %s", name, reason)
        self.drop(name)

    def drop(self, name: str) -> None:
        if self._by_name.pop(name, None) is not None:
            self._publish()

    def forget(self, peer_id: str) -> None:
        """Drop ``peer_id`` until zeroconf reports it (added or updated) again.

        Its SRV and TXT records leave zeroconf's cache too, so that the next time they are
        heard (its announcements when it restarts, its answer to any query) they are new
        and the browser reports the instance as updated. And we ask for it ourselves now
        and then (``FORGET_RECHECK``, doubling up to ``FORGET_RECHECK_MAX``, the doubling
        kept across forgets until it leaves for good): a peer that merely dropped off the
        network for a while comes back even if nothing else queries for it.
        """
        names = [name for name, peer in self._by_name.items() if peer.id == peer_id]
        for name in names:
            self._cancel_resolve(name)
            del self._by_name[name]
            self._evict_cached(name)
            delay = self._recheck_delay.get(name, FORGET_RECHECK)
            self._recheck_delay[name] = min(2 * delay, FORGET_RECHECK_MAX)
            if self._zc is not None and not self._closed:
                self._start_task(name, self._recheck(self._zc, name, delay))
        if names:
            self._publish()

    async def _recheck(self, zc: Zeroconf, name: str, delay: float) -> None:
        # Ends when the instance answers, or is cancelled by any browser event for it (which
        # resolves it anew), by its removal or by aclose().
        while True:
            await asyncio.sleep(delay)
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(zc, RESOLVE_TIMEOUT * 1000, question_type=QUESTION_TYPE):
                self.update_from_info(name, info)
                return
            delay = min(2 * delay, FORGET_RECHECK_MAX)

    def _evict_cached(self, name: str) -> None:
        # The PTR stays: a goodbye is only acted upon for a PTR in the cache, and its expiry
        # is what finally removes a peer that died without one.
        zc = self._zc
        if zc is not None and not zc.done:
            zc.cache.async_remove_records(zc.cache.async_entries_with_name(name))

    def _publish(self) -> None:
        view = {peer.id: peer for peer in self._by_name.values()}
        if view == self._view:
            return
        for peer_id in self._view.keys() - view.keys():
            self._log.info("discovery: peer %r left", peer_id)
        for peer_id, peer in view.items():
            if self._view.get(peer_id) != peer:
                self._log.info("discovery: peer %r at %s", peer_id, peer.address)
        self._view = view
        if self._on_change is not None:
            try:
                self._on_change(dict(view))
            except Exception:  # a faulty callback must not break zeroconf's record handling
                self._log.exception("discovery: on_change callback failed")

    async def aclose(self) -> None:
        """Stop reacting to events and cancel every resolution still running."""
        self._closed = True
        tasks = list(self._resolving.values())
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait never raises the tasks' CancelledError into us, so a cancellation
            # of aclose() itself still propagates.
            await asyncio.wait(tasks)


# -- Discovery --------------------------------------------------------------------------------


def _check_text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"discovery: {key} must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8")) > _MAX_FIELD_BYTES:
        raise ConfigError(f"discovery: {key} is longer than {_MAX_FIELD_BYTES} bytes in UTF-8")
    return value


def _check_ips(key: str, values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ConfigError(f"discovery: {key} must be a list of IP addresses, got a string")
    checked = []
    for value in values:
        try:
            checked.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ConfigError(f"discovery: {key} holds {value!r}, not an IP address") from None
    if not checked:
        raise ConfigError(f"discovery: {key} is empty (use None for the default)")
    return checked


def _host_ipv4() -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4]


def _host_networks(interfaces: Sequence[str] | None) -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets this host is on (those of ``interfaces`` only, when given)."""
    return [
        ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}").network
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and (interfaces is None or ip.ip in interfaces)
    ]


def _check_interfaces_exist(interfaces: Sequence[str]) -> None:
    # zeroconf fails on an address no interface has with a bare OSError (ENODEV), and leaks
    # a socket doing so: catch it first, with a message that says what is wrong.
    host = {str(ip) for ip in _host_ipv4()}
    for text in interfaces:
        if ipaddress.ip_address(text).version == 4 and text not in host:
            raise ConfigError(
                f"discovery: interfaces holds {text}, which is not an address of this host "
                f"(it has {', '.join(sorted(host)) or 'none'})"
            )


def _default_addresses(interfaces: Sequence[str] | None) -> list[str]:
    """IPv4 addresses to advertise when none are given.

    The IPv4 addresses among ``interfaces`` when given; otherwise every IPv4 address of the
    host that is neither loopback nor link-local (then link-local, then 127.0.0.1, when
    there is nothing else).
    """
    if interfaces:
        ipv4 = [ip for ip in interfaces if ipaddress.ip_address(ip).version == 4]
        if ipv4:
            return ipv4
    found = _host_ipv4()
    best = [str(ip) for ip in found if not (ip.is_loopback or ip.is_link_local)]
    if best:
        return best
    link_local = [str(ip) for ip in found if ip.is_link_local]
    return link_local or ["127.0.0.1"]


class Discovery:
    """Advertise this node and track the others of the same cluster/protocol/model."""

    def __init__(
        self,
        *,
        node_id: str,
        cluster: str,
        port: int,
        fingerprint: str,
        protocol_version: int = PROTOCOL_VERSION,
        addresses: Sequence[str] | None = None,
        interfaces: Sequence[str] | None = None,
        on_change: ChangeCallback | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """Check the settings; nothing touches the network before ``start()``.

        ``addresses``: IPs to advertise (default: see ``_default_addresses``).
        ``interfaces``: IPs of the interfaces mDNS runs on (default: all of them).
        ``on_change``: called in the event loop with the new view each time it changes.
        Bad settings raise ConfigError naming the setting.
        """
        self.node_id = _check_text("node_id", node_id)
        self.cluster = _check_text("cluster", cluster)
        self.fingerprint = _check_text("fingerprint", fingerprint)
        if type(port) is not int or not 1 <= port <= 65535:
            raise ConfigError(f"discovery: port must be an integer in 1..65535, got {port!r}")
        self.port = port
        if type(protocol_version) is not int or not 0 <= protocol_version < 10**9:
            raise ConfigError(f"discovery: protocol_version must be a non-negative integer, got {protocol_version!r}")
        self.protocol_version = protocol_version
        self._addresses = _check_ips("addresses", addresses)
        self._interfaces = _check_ips("interfaces", interfaces)
        self._log = logger or logging.getLogger(__name__)
        self.instance = instance_label(self.node_id, self.cluster)
        self.service_name = f"{self.instance}.{SERVICE_TYPE}"
        self._boot = secrets.token_hex(4)
        self._table = _PeerTable(
            check=self._check,
            own_name=self.service_name,
            on_change=on_change,
            logger=self._log,
            networks=lambda: _host_networks(self._interfaces),
        )
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announce: asyncio.Future[Any] | None = None
        self._started = False
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    def _check(self, peer: PeerInfo) -> tuple[int, str] | None:
        if peer.id == self.node_id and peer.cluster == self.cluster:
            return logging.WARNING, "has our own node id (two nodes with one id?)"
        reason = incompatibility(
            peer,
            cluster=self.cluster,
            protocol_version=self.protocol_version,
            fingerprint=self.fingerprint,
        )
        if reason is None:
            return None
        # Other clusters sharing the LAN are normal; a mismatch inside ours is a mistake.
        level = logging.INFO if peer.cluster != self.cluster else logging.WARNING
        return level, reason

    # -- lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the mDNS sockets, browse for peers, then advertise this node.

        Raises RuntimeError when called twice (or after aclose), ConfigError when another
        live node already advertises our id in our cluster.
        """
        if self._started or self._closed:
            raise RuntimeError("Discovery can be started only once")
        self._started = True
        try:
            await self._start()
        except NonUniqueNameException:
            await self.aclose()
            raise ConfigError(
                f"discovery: node id {self.node_id!r} is already advertised in cluster "
                f"{self.cluster!r} by another live node"
            ) from None
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        if self._interfaces is not None:
            _check_interfaces_exist(self._interfaces)
        addresses = self._addresses or _default_addresses(self._interfaces)
        interfaces = self._interfaces if self._interfaces is not None else InterfaceChoice.All
        self._aiozc = aiozc = AsyncZeroconf(interfaces=interfaces)
        self._table.attach(aiozc.zeroconf)
        # Browse first: we hear the others while our own name is being probed.
        self._browser = AsyncServiceBrowser(
            aiozc.zeroconf,
            SERVICE_TYPE,
            handlers=[self._table.on_service_state_change],
            question_type=QUESTION_TYPE,
        )
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=self.port,
            properties=build_txt(
                node_id=self.node_id,
                cluster=self.cluster,
                protocol_version=self.protocol_version,
                fingerprint=self.fingerprint,
                boot=self._boot,
            ),
            server=f"{self.instance}.local.",
            parsed_addresses=addresses,
            host_ttl=RECORD_TTL,
            other_ttl=RECORD_TTL,
        )
        # Probes for the name (about 1 s), then returns; the announcements go on in the
        # background (kept to be cancelled on close).
        announce = await aiozc.async_register_service(info)
        self._announce = asyncio.ensure_future(announce)
        self._log.info(
            "discovery: advertising %r (cluster %r) as %s on %s",
            self.node_id,
            self.cluster,
            self.instance,
            ", ".join(f"{a}:{self.port}" for a in addresses),
        )

    async def aclose(self) -> None:
        """Withdraw our advert (goodbye packets) and stop browsing. Idempotent.

        The shutdown runs in a task of its own: if the caller is cancelled it still
        completes, and any later ``aclose()`` waits for that same shutdown.
        """
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        await self._table.aclose()
        if self._announce is not None and not self._announce.done():
            self._announce.cancel()
            await asyncio.wait([self._announce])
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            await self._aiozc.async_close()  # unregisters every service: the goodbyes

    # -- the view

    def peers(self) -> dict[str, PeerInfo]:
        """Current view: id -> PeerInfo of every compatible node but ourselves."""
        return self._table.view()

    def forget(self, peer_id: str) -> None:
        """Drop a peer judged unreachable; it comes back when zeroconf reports it again.

        That is when it restarts (a new ``boot`` token), when it answers someone's query, or
        when it answers ours: we ask for it ``FORGET_RECHECK`` s later, then at doubling
        intervals up to ``FORGET_RECHECK_MAX``. The doubling carries over to the next forget
        of the same peer, so a peer reachable by mDNS but not by HTTP is retried less and
        less often. Forgetting an id not in the view does nothing.
        """
        self._table.forget(peer_id)


async def browse(
    *,
    duration: float = 3.0,
    cluster: str | None = None,
    interfaces: Sequence[str] | None = None,
    logger: logging.Logger | None = None,
) -> list[PeerInfo]:
    """Listen for ``duration`` seconds and return the nodes heard of, sorted by cluster, id.

    Lists every gossipfl node, whatever its protocol version or model, unless ``cluster``
    narrows it to one cluster. Advertises nothing.
    """
    if not duration >= 0:
        raise ConfigError(f"browse: duration must be >= 0 seconds, got {duration!r}")
    checked = _check_ips("interfaces", interfaces)
    log = logger or logging.getLogger(__name__)

    def check(peer: PeerInfo) -> tuple[int, str] | None:
        if cluster is not None and peer.cluster != cluster:
            return logging.DEBUG, f"is in cluster {peer.cluster!r}"
        return None

    if checked is not None:
        _check_interfaces_exist(checked)
    table = _PeerTable(check=check, own_name=None, on_change=None, logger=log, networks=lambda: _host_networks(checked))
    aiozc = AsyncZeroconf(interfaces=checked if checked is not None else InterfaceChoice.All)
    try:
        table.attach(aiozc.zeroconf)
        browser = AsyncServiceBrowser(
            aiozc.zeroconf,
            SERVICE_TYPE,
            handlers=[table.on_service_state_change],
            question_type=QUESTION_TYPE,
        )
        try:
            await asyncio.sleep(duration)
            # Let resolutions started near the end finish, within bounds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BROWSE_SETTLE):
                    await table.settle()
        finally:
            await browser.async_cancel()
    finally:
        await table.aclose()
        await aiozc.async_close()
    return sorted(table.resolved(), key=lambda peer: (peer.cluster, peer.id))
