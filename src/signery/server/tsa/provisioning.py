"""Making the TSA: a key in its key store, certified by the built-in issuing CA
under the time-stamping profile, through the same remote-key mechanism as the
CA's own certificates. ``signery init`` makes it; an installation initialized
before the TSA existed makes it on first use (signery.server.tsa.service)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from signery.errors import (
    ConfigurationError,
    UnknownKeyStore,
)
from signery.keystores import (
    Destroyable,
    KeyContext,
    KeyHandle,
    KeyStoreRegistry,
    remote_private_key,
)
from signery.protocol import AuditOutcome
from signery.server.audit.events import (
    SYSTEM,
    AuditRecord,
    EventKind,
)
from signery.server.ca.models import CaAuthorityRow
from signery.server.ca.profiles import TIME_STAMPING
from signery.server.ca.service import (
    BACKDATE,
    ISSUING,
    Authority,
    CreatedCa,
    random_serial,
    rsa_or_ec,
    signature_hash,
    with_revocation_pointers,
)
from signery.server.persistence.db import new_id
from signery.server.runtime.clock import Clock
from signery.server.tsa.authority import TSA, TsaConfig, authority_of

TSA_VALIDITY = timedelta(days=10 * 365)


@dataclass(frozen=True, slots=True)
class ProvisionedTsa:
    """A new TSA key and certificate, and the row for the caller's transaction."""

    row: CaAuthorityRow
    handle: KeyHandle
    certificate: x509.Certificate


def provision_tsa(
    keystores: KeyStoreRegistry,
    clock: Clock,
    config: TsaConfig,
    *,
    issuing: Authority,
    root_tsg_id: str,
    installation: str,
) -> ProvisionedTsa:
    """Generate the TSA key in its store and certify it with the issuing CA.

    Returns the row for the caller to add in its own transaction. If certifying
    fails the key is destroyed here; if the caller's transaction fails, the caller
    destroys ``ProvisionedTsa.handle``."""
    try:
        store = keystores.get(config.storage)
    except UnknownKeyStore as e:
        # The operator's setting, not the client's request: a server error.
        raise ConfigurationError(
            f"tsa_storage {config.storage!r} is not a configured key store"
        ) from e
    row_id = new_id()
    key = store.generate(
        config.algorithm, KeyContext(row_id, 1, root_tsg_id, label=f"signery-tsa-{installation}")
    )
    try:
        now = clock.now()
        issuer = issuing.certificate
        public_key = rsa_or_ec(key.public_key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organization),
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"Signery Timestamping Authority {installation}"
                        ),
                    ]
                )
            )
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + TSA_VALIDITY, issuer.not_valid_after_utc))
        )
        builder = (
            TIME_STAMPING.apply(builder)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(rsa_or_ec(issuer.public_key())),
                critical=False,
            )
        )
        # The TSA certificate is revocable like a code-signing one: its CRL and
        # issuer are where a verifier checking the token's chain looks for them.
        certificate = with_revocation_pointers(builder, config.public_url).sign(
            remote_private_key(
                keystores.get(issuing.handle.store),
                issuing.handle,
                rsa_or_ec(issuer.public_key()),
            ),
            signature_hash(issuing.algorithm),
        )
    except BaseException:
        if isinstance(store, Destroyable):
            store.destroy(key.handle)
        raise
    row = CaAuthorityRow(
        id=row_id,
        role=TSA,
        algorithm=config.algorithm.value,
        storage=store.name,
        store_ref=key.handle.ref,
        tsg_id=root_tsg_id,
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        created_at=now,
    )
    return ProvisionedTsa(row, key.handle, certificate)


def provision_at_init(
    keystores: KeyStoreRegistry,
    clock: Clock,
    config: TsaConfig,
    created: CreatedCa,
    *,
    root_tsg_id: str,
    installation: str,
) -> ProvisionedTsa | None:
    """The TSA for ``signery init``, certified by the CA made in the same run; None
    when its key store is not opened by init (it is then made on first use)."""
    if config.storage not in keystores.names():
        return None
    issuing = next(r for r in created.rows if r.role == ISSUING)
    return provision_tsa(
        keystores,
        clock,
        config,
        issuing=authority_of(issuing),
        root_tsg_id=root_tsg_id,
        installation=installation,
    )


def created_record(provisioned: ProvisionedTsa, tsg_path: str, *, when: str) -> AuditRecord:
    """The ``tsa.created`` event, for init and for first use alike."""
    cert = provisioned.certificate
    return AuditRecord(
        EventKind.TSA_CREATED,
        AuditOutcome.SUCCEEDED,
        SYSTEM,
        tsg_id=provisioned.row.tsg_id,
        tsg_path=tsg_path,
        key_id=provisioned.row.id,
        key_version=1,
        algorithm=provisioned.row.algorithm,
        details={
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "storage": provisioned.row.storage,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "provisioned": when,
        },
    )
