"""What the CA and the external CA connectors ask of signing keys.

The dependency runs one way: keys use the CA and the connectors, never the
reverse. Where the CA (revocation, subject policies) or a connector (in use?
which stores?) needs to know about keys, it declares a narrow interface and this
module implements it over the key tables.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from signery.protocol import CertificateAuthority, KeyStatus
from signery.server.ca.models import SubjectPolicyRow
from signery.server.ca.revocation import CertificateHolder
from signery.server.keys.models import KeyVersionRow, SigningKeyRow
from signery.server.tsg.models import TsgRow


class CertifiedKeys:
    """The signing keys as the CA and the connectors see them
    (signery.server.ca.revocation.CertificateHolders,
    signery.server.connectors.service.ConnectorUsers)."""

    def holder(self, s: Session, key_version_id: str) -> CertificateHolder | None:
        version = s.get(KeyVersionRow, key_version_id)
        if version is None:
            return None
        key = s.get(SigningKeyRow, version.key_id)
        if key is None:
            return None
        return CertificateHolder(
            key_id=key.id, key_version=version.version, tsg_id=key.tsg_id, algorithm=key.algorithm
        )

    def key_names(self, s: Session, connector_id: str, *, limit: int) -> Sequence[str]:
        return s.scalars(
            select(SigningKeyRow.name)
            .where(SigningKeyRow.ca_connector_id == connector_id)
            .limit(limit)
        ).all()

    def key_stores(self, s: Session, connector_id: str) -> Sequence[str]:
        return s.scalars(
            select(SigningKeyRow.storage)
            .where(SigningKeyRow.ca_connector_id == connector_id)
            .distinct()
        ).all()


def keys_outside_every_policy(s: Session) -> int:
    """How many keys below the root TSG have built-in CA certificates while no
    subject policy covers their TSG (after an upgrade): their renewals and
    rotations are refused until a root superuser sets one."""
    covered = list(
        s.scalars(select(TsgRow.path).join(SubjectPolicyRow, SubjectPolicyRow.tsg_id == TsgRow.id))
    )
    paths = s.scalars(
        select(TsgRow.path)
        .join(SigningKeyRow, SigningKeyRow.tsg_id == TsgRow.id)
        .where(
            SigningKeyRow.certificate_authority == CertificateAuthority.BUILTIN.value,
            SigningKeyRow.status != KeyStatus.DESTROYED.value,
            TsgRow.depth > 0,
        )
    )
    return sum(1 for path in paths if not any(path.startswith(c) for c in covered))
