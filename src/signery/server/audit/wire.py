"""An audit event row as the API and the audit sinks show it (one shape for both,
so that a forwarded event and a listed one never differ)."""

from __future__ import annotations

import json

from signery import protocol as p
from signery.protocol import AuditOutcome, PrincipalType
from signery.server.audit.models import AuditEventRow


def event_to_wire(row: AuditEventRow) -> p.AuditEvent:
    return p.AuditEvent(
        id=row.id,
        seq=row.seq,
        time=row.time,
        kind=row.kind,
        outcome=AuditOutcome(row.outcome),
        reason=row.reason,
        tsg_id=row.tsg_id,
        principal=p.AuditPrincipal(
            type=PrincipalType(row.principal_type), id=row.principal_id, name=row.principal_name
        ),
        key_id=row.key_id,
        key_version=row.key_version,
        algorithm=row.algorithm,
        digest=row.digest,
        client_ip=row.client_ip,
        user_agent=row.user_agent,
        client_machine=row.client_machine,
        client_tool=row.client_tool,
        request_id=row.request_id,
        node_id=row.node_id,
        details=json.loads(row.details or "{}"),
        tsg_path=row.tsg_path,
        node_seq=row.node_seq,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )
