"""HTTP routes for audit events and usage counters."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from signery import protocol as p
from signery.protocol import API_PREFIX, AuditOutcome, ExportFormat, Instant
from signery.server.http.deps import PrincipalDep, ServicesDep
from signery.server.reports.service import CSV, JSONL, MAX_PAGE, EventFilter, UsageQuery

router = APIRouter(prefix=API_PREFIX, tags=["audit"])


@router.get("/audit/events", response_model=p.AuditEventPage)
def audit_events(
    principal: PrincipalDep,
    services: ServicesDep,
    tsg_id: str | None = None,
    key_id: str | None = None,
    account_id: str | None = None,
    outcome: AuditOutcome | None = None,
    kind: str | None = None,
    since: Instant | None = None,
    until: Instant | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
    order: str = "asc",
) -> p.AuditEventPage:
    f = EventFilter(
        tsg_id=tsg_id,
        key_id=key_id,
        account_id=account_id,
        outcome=outcome,
        kind=kind,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
        descending=order == "desc",
    )
    return services.audit.events(principal, f)


@router.get("/audit/checkpoints", response_model=p.AuditCheckpointList)
def audit_checkpoints(
    principal: PrincipalDep,
    services: ServicesDep,
    node_id: str | None = None,
    after: Instant | None = None,
) -> p.AuditCheckpointList:
    return services.checkpoints.listing(principal, node_id, after)


@router.post("/audit/checkpoints", response_model=p.AuditCheckpointList)
def audit_checkpoint_now(principal: PrincipalDep, services: ServicesDep) -> p.AuditCheckpointList:
    """Checkpoint every chain head that moved since its last checkpoint, now."""
    return services.checkpoints.request(principal)


@router.get("/audit/checkpoints/public-key", response_model=p.AuditSigningKey)
def audit_checkpoint_key(principal: PrincipalDep, services: ServicesDep) -> p.AuditSigningKey:
    return services.checkpoints.public_key(principal)


@router.get("/usage", response_model=p.UsageReport)
def usage(
    principal: PrincipalDep,
    services: ServicesDep,
    scope: p.UsageScope | None = None,
    tsg_id: str | None = None,
    since: date | None = None,
    until: date | None = None,
    top: Annotated[int | None, Query(ge=1, le=MAX_PAGE)] = None,
    group_by: Literal["day"] | None = None,
) -> p.UsageReport:
    q = UsageQuery(scope, tsg_id, since, until, top, by_day=group_by == "day")
    return services.audit.usage(principal, q)


@router.get(
    "/audit/export",
    response_class=StreamingResponse,
    responses={200: {"content": {JSONL: {}, CSV: {}}}},
)
def audit_export(
    principal: PrincipalDep,
    services: ServicesDep,
    since: Instant | None = None,
    until: Instant | None = None,
    format: ExportFormat = ExportFormat.JSONL,
) -> StreamingResponse:
    """The audit events the caller may read, oldest first, streamed page by page."""
    lines = services.audit.export(principal, since, until, format)
    return StreamingResponse(lines, media_type=CSV if format is ExportFormat.CSV else JSONL)
