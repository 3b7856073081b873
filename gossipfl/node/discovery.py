"""Find the other nodes of a cluster on the local network with mDNS / DNS-SD (zeroconf).

Every node advertises one service instance of type ``_gossipfl._tcp.local.``; what the
advert holds (SRV, A and TXT records, the instance name) and how it is parsed and checked is
``gossipfl.node.adverts``. This module is the zeroconf machinery around it: advertising this
node, browsing for the others, and keeping the view of those that can gossip with us.

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
import ipaddress
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self

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
from gossipfl.node.adverts import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    PeerInfo,
    _check_interfaces_exist,
    _check_ips,
    _check_text,
    _default_addresses,
    _host_networks,
    build_txt,
    incompatibility,
    instance_label,
    on_link_first,
    parse_advert,
)

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


ChangeCallback = Callable[[dict[str, PeerInfo]], None]


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
