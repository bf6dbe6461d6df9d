"""Certificate profiles: what each kind of certificate Signery issues or asks for
may be used for, spelled once.

A profile is the basicConstraints, keyUsage and extendedKeyUsage of one kind of
certificate: a code-signing leaf (issued by the built-in CA, or asked of an
external CA in a CSR), the time-stamping authority's certificate, and the root
and issuing CA certificates. Builders take them from here instead of writing the
nine keyUsage flags again.

The extensions are added in a fixed order (basicConstraints, keyUsage,
extendedKeyUsage in a certificate; extendedKeyUsage, keyUsage in a CSR's
extensionRequest): the DER of every certificate and CSR is the same as before
profiles existed, so nothing a verifier or an external CA sees changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A keyUsage with the named bits set; the bits no Signery certificate asserts
    (encipherment, key agreement) are always clear."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class CertificateProfile:
    """The usage extensions of one kind of certificate (RFC 5280 §4.2.1.3, .9, .12).

    keyUsage and basicConstraints are always critical; extendedKeyUsage is
    critical only where a specification asks for it (RFC 3161 §2.3)."""

    name: str
    basic_constraints: x509.BasicConstraints
    key_usage: x509.KeyUsage
    extended_key_usage: x509.ExtendedKeyUsage | None = None
    extended_key_usage_critical: bool = False

    def apply(self, builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        """``builder`` with basicConstraints, keyUsage and extendedKeyUsage added."""
        builder = builder.add_extension(self.basic_constraints, critical=True).add_extension(
            self.key_usage, critical=True
        )
        if self.extended_key_usage is not None:
            builder = builder.add_extension(
                self.extended_key_usage, critical=self.extended_key_usage_critical
            )
        return builder

    def request(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequestBuilder:
        """``builder`` asking for this profile (RFC 2986 extensionRequest):
        extendedKeyUsage, then keyUsage. basicConstraints is left to the CA."""
        if self.extended_key_usage is not None:
            builder = builder.add_extension(
                self.extended_key_usage, critical=self.extended_key_usage_critical
            )
        return builder.add_extension(self.key_usage, critical=True)


CODE_SIGNING = CertificateProfile(
    "code-signing",
    # A leaf: it certifies no other key (CA/B code-signing baseline §7.1.2.3).
    basic_constraints=x509.BasicConstraints(ca=False, path_length=None),
    key_usage=_key_usage(digital_signature=True),
    extended_key_usage=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
)
"""A code-signing leaf: KU digitalSignature, EKU codeSigning."""

TIME_STAMPING = CertificateProfile(
    "time-stamping",
    basic_constraints=x509.BasicConstraints(ca=False, path_length=None),
    # digitalSignature, and nonRepudiation (contentCommitment) as TSAs customarily
    # assert; OpenSSL's timestamp purpose allows only these two.
    key_usage=_key_usage(digital_signature=True, content_commitment=True),
    # RFC 3161 §2.3: the TSA's certificate MUST contain exactly one EKU,
    # id-kp-timeStamping, and the extension MUST be critical.
    extended_key_usage=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]),
    extended_key_usage_critical=True,
)
"""The time-stamping authority's certificate."""

ROOT_CA = CertificateProfile(
    "root-ca",
    # One CA below the root: the issuing CA.
    basic_constraints=x509.BasicConstraints(ca=True, path_length=1),
    key_usage=_key_usage(key_cert_sign=True, crl_sign=True),
)
"""The built-in root CA: signs the issuing CA's certificate."""

ISSUING_CA = CertificateProfile(
    "issuing-ca",
    # No CA below the issuing CA: it certifies leaves only.
    basic_constraints=x509.BasicConstraints(ca=True, path_length=0),
    key_usage=_key_usage(key_cert_sign=True, crl_sign=True),
)
"""The built-in issuing CA: signs leaves and the CRL."""
