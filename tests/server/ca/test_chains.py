"""The chain check of external CA certificates, rule by rule, on certificates built
here so that each one breaks exactly one rule (the openssl-made happy paths and
the three refusals the issue names are in test_csr_connector.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signery.errors import (
    CertificateChainUntrusted,
    CertificateEkuMissing,
    CertificateKeyMismatch,
    CertificateMalformed,
    CertificateRejected,
    CertificateUsageInvalid,
    InvalidRequest,
)
from signery.server.ca.chains import (
    parse_certificates,
    parse_trust_anchors,
    pem_of,
    validate_issued_chain,
)

NOW = datetime.now(UTC)
Builder = Callable[[x509.CertificateBuilder], x509.CertificateBuilder]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(*, cert_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class Pki:
    """Root -> intermediate -> leaf, each step adjustable."""

    def __init__(self, intermediate_eku: list[x509.ObjectIdentifier] | None = None) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca("Root", self.root_key, self.root_key, _name("Root"), None)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._ca(
            "Intermediate", self.inter_key, self.root_key, _name("Root"), intermediate_eku
        )
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())

    def _ca(
        self,
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        eku: list[x509.ObjectIdentifier] | None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=100))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ku(cert_sign=True, digital_signature=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def leaf(
        self,
        change: Builder = lambda b: b,
        *,
        eku: bool = True,
        valid: tuple[timedelta, timedelta] = (timedelta(days=-1), timedelta(days=10)),
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("Leaf"))
            .issuer_name(_name("Intermediate"))
            .public_key(self.leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW + valid[0])
            .not_valid_after(NOW + valid[1])
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                False,
            )
        )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        return change(builder).sign(self.inter_key, hashes.SHA256())

    def check(
        self, leaf: x509.Certificate, *extra: x509.Certificate
    ) -> tuple[x509.Certificate, ...]:
        return validate_issued_chain(
            [leaf, self.intermediate, *extra], self.leaf_key.public_key(), [self.root], NOW
        )


def test_a_good_chain_comes_back_leaf_to_root() -> None:
    pki = Pki(intermediate_eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    leaf = pki.leaf()
    # Any order in, the verified path out.
    chain = validate_issued_chain(
        [pki.intermediate, pki.root, leaf], pki.leaf_key.public_key(), [pki.root], NOW
    )
    assert chain == (leaf, pki.intermediate, pki.root)
    assert parse_certificates(pem_of(chain)) == list(chain)


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda p: (p.leaf(eku=False),), CertificateEkuMissing, "no extended key usage"),
        (
            lambda p: (
                p.leaf(
                    lambda b: b.add_extension(
                        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
                    ),
                    eku=False,
                ),
            ),
            CertificateEkuMissing,
            "1.3.6.1.5.5.7.3.2",
        ),
        (
            lambda p: (
                p.leaf(
                    lambda b: b.add_extension(
                        x509.BasicConstraints(ca=True, path_length=None), True
                    )
                ),
            ),
            CertificateUsageInvalid,
            "CA certificate",
        ),
        (
            lambda p: (
                p.leaf(
                    lambda b: b.add_extension(
                        _ku(cert_sign=False, digital_signature=False), critical=True
                    )
                ),
            ),
            CertificateUsageInvalid,
            "digitalSignature",
        ),
        (
            lambda p: (p.leaf(valid=(timedelta(days=-20), timedelta(days=-1))),),
            CertificateChainUntrusted,
            "expired",
        ),
        (
            lambda p: (p.leaf(valid=(timedelta(days=1), timedelta(days=10))),),
            CertificateChainUntrusted,
            "not valid before",
        ),
    ],
    ids=["no-eku", "client-auth-only", "leaf-is-ca", "no-digital-signature", "expired", "future"],
)
def test_each_broken_rule_has_its_code(
    make: Callable[[Pki], tuple[x509.Certificate, ...]],
    error: type[CertificateRejected],
    fragment: str,
) -> None:
    pki = Pki()
    with pytest.raises(error) as caught:
        pki.check(*make(pki))
    assert fragment in caught.value.detail


def test_an_intermediate_restricted_to_other_uses_breaks_the_path() -> None:
    pki = Pki(intermediate_eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(CertificateChainUntrusted, match="excludes codeSigning"):
        pki.check(pki.leaf())


def test_any_eku_on_the_intermediate_is_accepted() -> None:
    pki = Pki(intermediate_eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    assert len(pki.check(pki.leaf())) == 3


def test_a_missing_intermediate_and_a_foreign_key_are_refused() -> None:
    pki = Pki()
    leaf = pki.leaf()
    with pytest.raises(CertificateChainUntrusted):
        validate_issued_chain([leaf], pki.leaf_key.public_key(), [pki.root], NOW)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CertificateKeyMismatch):
        validate_issued_chain([leaf, pki.intermediate], other, [pki.root], NOW)


def test_parsing() -> None:
    pki = Pki()
    with pytest.raises(CertificateMalformed):
        parse_certificates("")
    with pytest.raises(CertificateMalformed):
        parse_certificates(pem_of([pki.root]) * 17)
    with pytest.raises(InvalidRequest, match="not a CA certificate"):
        parse_trust_anchors(pem_of([pki.leaf()]))
    assert parse_trust_anchors(pem_of([pki.root, pki.intermediate])) == [
        pki.root,
        pki.intermediate,
    ]
