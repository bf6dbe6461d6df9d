"""Facts about the HTTP request that services need for auditing, without HTTP."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

# IPv6 sources are counted per /64: one subscriber commonly holds a whole /64 (RFC
# 6177), so a limit per address would be a limit on nothing.
IPV6_SOURCE_PREFIX = 64
UNKNOWN_SOURCE = "unknown"


def source_of(client_ip: str | None) -> str:
    """The source a request is counted under by rate limits and refusal
    aggregation: its IPv4 address, or its IPv6 /64 (an IPv4-mapped IPv6 address is
    the IPv4 client). ``client_ip`` is what ``Services.context`` computed, trusted
    proxies honoured."""
    if client_ip is None:
        return UNKNOWN_SOURCE  # e.g. a UNIX socket: everyone there is one source
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    machine: str | None = None
    tool: str | None = None

    @property
    def source(self) -> str:
        return source_of(self.client_ip)

    def with_client(self, machine: str | None, tool: str | None) -> RequestContext:
        return replace(self, machine=machine or self.machine, tool=tool or self.tool)


SYSTEM_CONTEXT = RequestContext(request_id=None, client_ip=None, user_agent="signery-server")
