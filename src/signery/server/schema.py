"""Every table of the server, imported so that ``Base.metadata`` is complete
(Alembic migrations and the schema-drift test read it from here).

The built-in key store declares its own table (``signery.keystores.BUILTIN_METADATA``);
it is copied into ``Base.metadata`` here, so the migrations create it like any other."""

from signery.keystores import BUILTIN_METADATA
from signery.server.accounts.models import AccountKeyRow, AccountRow, UsedAssertionRow
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.audit.models import (
    AuditChainHeadRow,
    AuditCheckpointRow,
    AuditEventRow,
    AuditSigningKeyRow,
    AuditSinkCursorRow,
    AuditSinkGapRow,
    UsageCounterRow,
    UsageDailyRow,
)
from signery.server.ca.models import (
    CaAuthorityRow,
    CaConnectorRow,
    CertificateRow,
    CrlRow,
    SubjectPolicyRow,
)
from signery.server.keys.models import (
    CertificateRequestRow,
    KeyUsageQuotaRow,
    KeyVersionRow,
    SigningKeyRow,
)
from signery.server.limits.models import RateLimitCounterRow
from signery.server.persistence.db import Base
from signery.server.persistence.meta import ServerMetaRow
from signery.server.tsg.models import TsgRow
from signery.server.users.models import ApiTokenRow, RoleBindingRow, UserRow

for _table in BUILTIN_METADATA.tables.values():
    _table.to_metadata(Base.metadata)

__all__ = [
    "AccountKeyRow",
    "AccountRow",
    "ApiTokenRow",
    "ApprovalDecisionRow",
    "AuditChainHeadRow",
    "AuditCheckpointRow",
    "AuditEventRow",
    "AuditSigningKeyRow",
    "AuditSinkCursorRow",
    "AuditSinkGapRow",
    "Base",
    "CaAuthorityRow",
    "CaConnectorRow",
    "CertificateRequestRow",
    "CertificateRow",
    "CrlRow",
    "KeyUsageQuotaRow",
    "KeyVersionRow",
    "RateLimitCounterRow",
    "RoleBindingRow",
    "ServerMetaRow",
    "SigningGrantRow",
    "SigningKeyRow",
    "SigningRequestDigestRow",
    "SigningRequestRow",
    "SubjectPolicyRow",
    "TsgRow",
    "UsageCounterRow",
    "UsageDailyRow",
    "UsedAssertionRow",
    "UserRow",
]
