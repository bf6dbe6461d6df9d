"""Certificate profiles add exactly the extensions the builders used to spell out.

Regression guard for the profile refactor: each profile's extensions, in order,
with their criticality and DER, equal the keyUsage / extendedKeyUsage /
basicConstraints blocks that ``ca/service.py``, ``ca/tsa.py`` and
``keys/requests.py`` wrote by hand before (copied below as they were), so every
certificate and CSR Signery makes is the same DER as before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signery.server.ca.profiles import (
    CODE_SIGNING,
    ISSUING_CA,
    ROOT_CA,
    TIME_STAMPING,
    CertificateProfile,
)

KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profile test")])
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _ku(**bits: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(bits)
    return x509.KeyUsage(**flags)


# (extension, critical), in the order the builders added them before profiles.
BEFORE: dict[str, list[tuple[x509.ExtensionType, bool]]] = {
    "code-signing": [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_ku(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
    ],
    "time-stamping": [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_ku(digital_signature=True, content_commitment=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), True),
    ],
    "root-ca": [
        (x509.BasicConstraints(ca=True, path_length=1), True),
        (_ku(key_cert_sign=True, crl_sign=True), True),
    ],
    "issuing-ca": [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_ku(key_cert_sign=True, crl_sign=True), True),
    ],
}
# The CSR's extensionRequest (keys/requests.py build_csr): EKU, then KU.
CSR_BEFORE: list[tuple[x509.ExtensionType, bool]] = [
    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
    (_ku(digital_signature=True), True),
]


def _certificate(builder: x509.CertificateBuilder) -> x509.Certificate:
    return (
        builder.subject_name(NAME)
        .issuer_name(NAME)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(KEY, hashes.SHA256())
    )


def _der(extensions: x509.Extensions) -> list[tuple[str, bool, bytes]]:
    return [(e.oid.dotted_string, e.critical, e.value.public_bytes()) for e in extensions]


@pytest.mark.parametrize("profile", [CODE_SIGNING, TIME_STAMPING, ROOT_CA, ISSUING_CA])
def test_certificate_extensions_unchanged(profile: CertificateProfile) -> None:
    builder = x509.CertificateBuilder()
    for value, critical in BEFORE[profile.name]:
        builder = builder.add_extension(value, critical=critical)
    before = _certificate(builder)
    after = _certificate(profile.apply(x509.CertificateBuilder()))
    assert _der(after.extensions) == _der(before.extensions)


def test_csr_extension_request_unchanged() -> None:
    builder = x509.CertificateSigningRequestBuilder().subject_name(NAME)
    for value, critical in CSR_BEFORE:
        builder = builder.add_extension(value, critical=critical)
    before = builder.sign(KEY, hashes.SHA256())
    after = CODE_SIGNING.request(x509.CertificateSigningRequestBuilder().subject_name(NAME)).sign(
        KEY, hashes.SHA256()
    )
    assert _der(after.extensions) == _der(before.extensions)


def test_profiles_are_frozen() -> None:
    with pytest.raises(AttributeError):
        CODE_SIGNING.name = "other"  # type: ignore[misc]
