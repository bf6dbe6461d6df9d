"""Facts about the HTTP request that services need for auditing, without HTTP."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    machine: str | None = None
    tool: str | None = None

    def with_client(self, machine: str | None, tool: str | None) -> RequestContext:
        return replace(self, machine=machine or self.machine, tool=tool or self.tool)


SYSTEM_CONTEXT = RequestContext(request_id=None, client_ip=None, user_agent="signery-server")
