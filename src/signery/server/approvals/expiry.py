"""Expiry of signing requests nobody decided in time.

A pending request past its ``expires_at`` is marked expired, and audited as
``signing.approval.expired`` by the system, exactly once: by the scheduler job
(``expire_due``, run on every replica by ``server/runtime/jobs.py``), or earlier
by whoever reads or decides it first (the gate and the approvers' service call
``expire_if_due`` / ``mark_expired`` in their own transaction).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from signery.protocol import ApprovalStatus, AuditOutcome
from signery.server.approvals.models import SigningRequestRow
from signery.server.audit.events import SYSTEM, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.persistence.db import Database
from signery.server.tsg.tree import TsgDirectory

# Requests expired per scheduler run (the rest wait for the next run).
EXPIRE_BATCH = 500


class ApprovalExpiry:
    """Marks overdue pending requests expired; the scheduler's job and, within
    their transactions, the gate's and the approvers' service's check."""

    def __init__(self, *, db: Database, recorder: AuditRecorder, directory: TsgDirectory) -> None:
        self._db = db
        self._recorder = recorder
        self._directory = directory

    def expire_due(self, now: datetime) -> dict[str, int]:
        """Mark pending requests past their deadline expired (a scheduler job).

        Each request is claimed by a conditional UPDATE, so when several replicas
        sweep at once every request is expired, and audited, exactly once."""
        expired = 0
        with self._db.write() as s:
            due = s.execute(
                select(SigningRequestRow.id, SigningRequestRow.tsg_id)
                .where(
                    SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    SigningRequestRow.expires_at <= now,
                )
                .limit(EXPIRE_BATCH)
            ).all()
            for request_id, tsg_id in due:
                claimed = s.execute(
                    update(SigningRequestRow)
                    .where(
                        SigningRequestRow.id == request_id,
                        SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    )
                    .values(status=ApprovalStatus.EXPIRED.value, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]  # another replica got there
                    continue
                row = s.get(SigningRequestRow, request_id)
                assert row is not None
                s.refresh(row)
                self._audit_expired(s, row, self._directory.require_path(s, tsg_id))
                expired += 1
        return {"expired": expired}

    def expire_if_due(
        self, s: Session, r: SigningRequestRow, now: datetime, path: str | None = None
    ) -> None:
        if r.status == ApprovalStatus.PENDING_APPROVAL.value and r.expires_at <= now:
            self.mark_expired(s, r, path or self._directory.require_path(s, r.tsg_id), now)

    def mark_expired(self, s: Session, r: SigningRequestRow, path: str, now: datetime) -> None:
        r.status = ApprovalStatus.EXPIRED.value
        r.updated_at = now
        self._audit_expired(s, r, path)

    def _audit_expired(self, s: Session, r: SigningRequestRow, path: str) -> None:
        self._recorder.record(
            s,
            AuditRecord(
                EventKind.APPROVAL_EXPIRED,
                AuditOutcome.SUCCEEDED,
                SYSTEM,
                tsg_id=r.tsg_id,
                tsg_path=path,
                key_id=r.key_id,
                details={"request_id": r.id, "account_id": r.account_id},
            ),
        )
