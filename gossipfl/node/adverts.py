"""What a gossipfl node advertises over mDNS / DNS-SD, how to read it, and this host's addresses.

Every node advertises one service instance of type ``_gossipfl._tcp.local.``:

- SRV: a host name of its own (``<instance>.local.``) and the node's HTTP port;
- A: the addresses to reach it (by default every non-loopback IPv4 of the host);
- TXT: ``id`` (the node id, verbatim), ``cluster``, ``proto`` (protocol version),
  ``fp`` (model fingerprint) and ``boot`` (a random token drawn at each start, so that a
  node restarted after a crash is seen as *updated* even when nothing else changed).

The instance name is derived from the id and the cluster (sanitised id, truncated, plus a
hash of both), so it is a valid DNS label, unique per (cluster, id) and stable across
restarts. The real id only travels in TXT.

This module is the advert format and nothing else that touches the network: pure functions
that build, parse and compare adverts, the checks on discovery settings, and the helpers that
read this host's IPv4 addresses and subnets (``ifaddr``). The zeroconf machinery that sends
and hears adverts is ``gossipfl.node.discovery``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence

import ifaddr

from gossipfl.errors import ConfigError, WireError

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "PeerInfo",
    "build_txt",
    "incompatibility",
    "instance_label",
    "on_link_first",
    "parse_advert",
]

SERVICE_TYPE = "_gossipfl._tcp.local."
PROTOCOL_VERSION = 1

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


# -- discovery settings and this host's addresses --------------------------------------------


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
