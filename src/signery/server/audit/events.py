"""The audit trail's vocabulary: the closed set of event kinds, who acted, what
is recorded and what a signing attempt counts as. Values only: every service
that records events imports this module, and only the recorder
(signery.server.audit.recorder) writes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from signery.errors import ErrorKind, SigneryError
from signery.protocol import AuditOutcome, PrincipalType
from signery.server.access.authz import Principal
from signery.server.access.context import RequestContext


class EventKind(StrEnum):
    """The closed vocabulary of audit events."""

    SERVER_INITIALIZED = "server.initialized"
    SIGN_SUCCEEDED = "signing.sign.succeeded"
    SIGN_DENIED = "signing.sign.denied"
    SIGN_INVALID = "signing.sign.invalid"
    SIGN_ERROR = "signing.sign.error"
    TOKEN_ISSUED = "auth.token.issued"
    TOKEN_REFUSED = "auth.token.refused"
    AUTHENTICATION_FAILED = "auth.authentication.failed"
    REQUEST_REFUSED = "request.refused"
    # Acting on someone's credentials or roles beyond the caller's own reach
    # (signery.server.access.authz.decide_over / decide_binding, a named signer's keys).
    ESCALATION_REFUSED = "authz.escalation.refused"
    TSG_CREATED = "tsg.created"
    USER_CREATED = "user.created"
    API_TOKEN_CREATED = "user.api_token.created"
    API_TOKEN_REVOKED = "user.api_token.revoked"
    ROLE_BOUND = "role.bound"
    ROLE_UNBOUND = "role.unbound"
    ACCOUNT_CREATED = "account.created"
    ACCOUNT_DISABLED = "account.disabled"
    ACCOUNT_ENABLED = "account.enabled"
    ACCOUNT_KEY_ADDED = "account.key.added"
    ACCOUNT_KEY_REMOVED = "account.key.removed"
    KEY_CREATED = "key.created"
    KEY_ROTATED = "key.rotated"
    KEY_ROTATION_SCHEDULED = "key.rotation.scheduled"
    KEY_ROTATION_FAILED = "key.rotation.failed"
    # A connector key's new version waits for its certificate (key.rotated follows
    # when it is installed).
    KEY_ROTATION_REQUESTED = "key.rotation.requested"
    KEY_ROTATION_CANCELLED = "key.rotation.cancelled"
    KEY_DISABLED = "key.disabled"
    KEY_ENABLED = "key.enabled"
    KEY_DESTRUCTION_SCHEDULED = "key.destruction.scheduled"
    KEY_DESTRUCTION_CANCELLED = "key.destruction.cancelled"
    KEY_DESTROYED = "key.destroyed"
    KEY_DESTRUCTION_FAILED = "key.destruction.failed"
    KEY_POLICY_UPDATED = "key.policy.updated"
    APPROVAL_REQUESTED = "signing.approval.requested"
    APPROVAL_APPROVED = "signing.approval.approved"
    APPROVAL_DENIED = "signing.approval.denied"
    APPROVAL_REFUSED = "signing.approval.refused"
    APPROVAL_EXPIRED = "signing.approval.expired"
    GRANT_CREATED = "signing.grant.created"
    GRANT_USED = "signing.grant.used"
    GRANT_REVOKED = "signing.grant.revoked"
    MASTER_KEY_ROTATED = "keystore.master_key.rotated"
    CA_CREATED = "ca.created"
    CERTIFICATE_ISSUED = "ca.certificate.issued"
    CA_CERTIFICATE_REVOKED = "ca.certificate.revoked"
    CA_SUBJECT_POLICY_UPDATED = "ca.subject_policy.updated"
    CERTIFICATE_RENEWED = "key.certificate.renewed"
    CERTIFICATE_REISSUED = "key.certificate.reissued"
    CERTIFICATE_REVOKED = "key.certificate.revoked"
    CERTIFICATE_REQUESTED = "key.certificate.requested"
    CERTIFICATE_RECEIVED = "key.certificate.received"
    ENROLLMENT_FAILED = "key.certificate.enrollment_failed"
    CA_CONNECTOR_CREATED = "ca.connector.created"
    CA_CONNECTOR_UPDATED = "ca.connector.updated"
    CA_CONNECTOR_DELETED = "ca.connector.deleted"
    TSA_CREATED = "tsa.created"
    TIMESTAMP_ISSUED = "tsa.timestamp.issued"
    TIMESTAMP_REFUSED = "tsa.timestamp.refused"


def outcome_of(error: SigneryError) -> AuditOutcome:
    """How a refusal is classified in the audit trail."""
    if error.kind in (
        ErrorKind.UNAUTHENTICATED,
        ErrorKind.FORBIDDEN,
        ErrorKind.NOT_FOUND,
        ErrorKind.CONFLICT,
        # A limit that refuses (rate or quota) is a decision, not a failure.
        ErrorKind.TOO_MANY_REQUESTS,
    ):
        return AuditOutcome.DENIED
    if error.kind in (
        ErrorKind.INVALID_INPUT,
        ErrorKind.TOO_LARGE,
        ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    ):
        return AuditOutcome.INVALID
    return AuditOutcome.ERROR


SIGN_KIND_BY_OUTCOME = {
    AuditOutcome.SUCCEEDED: EventKind.SIGN_SUCCEEDED,
    AuditOutcome.DENIED: EventKind.SIGN_DENIED,
    AuditOutcome.INVALID: EventKind.SIGN_INVALID,
    AuditOutcome.ERROR: EventKind.SIGN_ERROR,
}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it, as recorded (a principal, or nobody identifiable)."""

    type: PrincipalType
    id: str | None = None
    name: str | None = None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        """The actor a principal is recorded as."""
        return cls(principal.type, principal.id, principal.name)


ANONYMOUS = Actor(PrincipalType.ANONYMOUS)
SYSTEM = Actor(PrincipalType.SYSTEM, None, "signery")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    kind: EventKind
    outcome: AuditOutcome
    actor: Actor
    reason: str | None = None
    tsg_id: str | None = None
    tsg_path: str | None = None
    key_id: str | None = None
    key_version: int | None = None
    algorithm: str | None = None
    digest: str | None = None
    context: RequestContext | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class Counted(StrEnum):
    """The column a counted attempt lands in: refusals by a decision (denied) are
    counted apart from failures (invalid requests and errors)."""

    SUCCEEDED = "successes"
    DENIED = "denied"
    FAILED = "failures"

    @classmethod
    def of(cls, outcome: AuditOutcome) -> Counted:
        if outcome is AuditOutcome.SUCCEEDED:
            return cls.SUCCEEDED
        if outcome is AuditOutcome.DENIED:
            return cls.DENIED
        return cls.FAILED


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """One signing attempt to count, per key, per key version (the ``key_versions``
    row id) and per account, in the lifetime counters and the day's."""

    outcome: Counted
    key_id: str | None = None
    account_id: str | None = None
    version_id: str | None = None
