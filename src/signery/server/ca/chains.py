"""Checking a certificate chain that an external CA issued for one of our keys.

A chain is accepted only when all of this holds, checked in this order so that
the refusal names the first thing wrong:

1. it parses (PEM certificates in any order, or a PKCS#7 certs-only bundle);
2. one certificate certifies exactly the key's public key (the leaf);
3. the leaf carries the codeSigning extended key usage (RFC 5280 §4.2.1.12), is
   not a CA, and allows digitalSignature if it has a key usage extension;
4. the leaf is valid now;
5. a path leads from the leaf to one of the connector's trust anchors.

Path building and validation (5) is ``cryptography.x509.verification`` (the
pinned cryptography 50 has it), not hand-written code. Its ready-made policies
are for TLS: the client verifier wants the clientAuth EKU and a
subjectAltName on the leaf, and its CA policy refuses intermediates whose EKU
does not include clientAuth. So the end-entity policy is ``permit_all`` (the
leaf's profile is checked by step 3 here, with our own error codes), and the
CA policy is the Web PKI one with two rules replaced: an intermediate's EKU,
when present, must allow codeSigning (or anyExtendedKeyUsage), as public
code-signing intermediates restrict it that way; and a trust anchor may lack
the keyUsage extension (RFC 5280 §6.1.1: a trust anchor is its name and key),
which `openssl req -x509` roots do. Everything else (signatures, validity of
every certificate, basicConstraints and path length, name chaining, weak
algorithms) is the verifier's Web PKI default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from signery.crypto import PublicKey
from signery.errors import (
    CertificateChainUntrusted,
    CertificateEkuMissing,
    CertificateKeyMismatch,
    CertificateMalformed,
    CertificateUsageInvalid,
    InvalidRequest,
)

# Longest path accepted from leaf to anchor (public code-signing PKIs use 3-4).
MAX_CHAIN_DEPTH = 6
MAX_CERTIFICATES = 16
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_CODE_SIGNING_OK = frozenset(
    {ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem_of(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def parse_certificates(text: str, what: str = "the chain") -> list[x509.Certificate]:
    """PEM certificates, or a PEM PKCS#7 certs-only bundle (what CAs often deliver)."""
    data = text.encode("utf-8", errors="replace")
    try:
        if b"-----BEGIN PKCS7-----" in data:
            certs = pkcs7.load_pem_pkcs7_certificates(data)
        else:
            certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateMalformed(f"{what} is not PEM certificates: {e}") from None
    if not certs:
        raise CertificateMalformed(f"{what} holds no certificate")
    if len(certs) > MAX_CERTIFICATES:
        raise CertificateMalformed(f"{what} holds more than {MAX_CERTIFICATES} certificates")
    return certs


def parse_trust_anchors(text: str) -> list[x509.Certificate]:
    """A connector's roots: CA certificates (a pinned intermediate is allowed)."""
    try:
        roots = parse_certificates(text, "roots_pem")
    except CertificateMalformed as e:
        raise InvalidRequest(e.detail) from None
    for root in roots:
        try:
            bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise InvalidRequest(
                f"roots_pem: {root.subject.rfc4514_string()} is not a CA certificate "
                "(no basicConstraints)"
            ) from None
        if not bc.ca:
            raise InvalidRequest(
                f"roots_pem: {root.subject.rfc4514_string()} is not a CA certificate"
            )
    return roots


def _leaf_for(certs: Sequence[x509.Certificate], public_key: PublicKey) -> x509.Certificate:
    wanted = public_key.public_bytes(*_SPKI)
    for cert in certs:
        if cert.public_key().public_bytes(*_SPKI) == wanted:
            return cert
    first = certs[0]
    raise CertificateKeyMismatch(
        "no certificate in the chain certifies this key's public key (the first one, "
        f"{first.subject.rfc4514_string()}, certifies another key): was it issued for "
        "this key's CSR?"
    )


def _check_code_signing_profile(leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateEkuMissing(
            "the certificate has no extended key usage extension; code signing needs "
            "codeSigning (1.3.6.1.5.5.7.3.3)"
        ) from None
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        names = ", ".join(o.dotted_string for o in eku) or "none"
        raise CertificateEkuMissing(
            f"the certificate's extended key usages ({names}) do not include codeSigning"
        )
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise CertificateUsageInvalid("the certificate is a CA certificate, not a signing one")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise CertificateUsageInvalid("the certificate's key usage does not allow digitalSignature")


def _ca_policy(anchors: Sequence[x509.Certificate]) -> verification.ExtensionPolicy:
    anchor_prints = {fingerprint(a) for a in anchors}

    def key_usage(
        _policy: verification.Policy, cert: x509.Certificate, ku: x509.KeyUsage | None
    ) -> None:
        if ku is None:
            if fingerprint(cert) in anchor_prints:
                return  # RFC 5280 §6.1.1: a trust anchor is a name and a key
            raise ValueError("a CA certificate without keyUsage")
        if not ku.key_cert_sign:
            raise ValueError("a CA certificate whose keyUsage lacks keyCertSign")

    def extended_key_usage(
        _policy: verification.Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
    ) -> None:
        if eku is not None and not _CODE_SIGNING_OK.intersection(eku):
            raise ValueError("a CA certificate whose extended key usage excludes codeSigning")

    return (
        verification.ExtensionPolicy.webpki_defaults_ca()
        .may_be_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, key_usage)
        .may_be_present(
            x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, extended_key_usage
        )
    )


def validate_issued_chain(
    certs: Sequence[x509.Certificate],
    public_key: PublicKey,
    anchors: Sequence[x509.Certificate],
    now: datetime,
) -> tuple[x509.Certificate, ...]:
    """The verified chain for ``public_key``, leaf first and trust anchor last, or a
    CertificateRejected naming what is wrong."""
    if not certs:
        raise CertificateMalformed("the chain holds no certificate")
    leaf = _leaf_for(certs, public_key)
    _check_code_signing_profile(leaf)
    if leaf.not_valid_before_utc > now:
        raise CertificateChainUntrusted(
            f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    if leaf.not_valid_after_utc <= now:
        raise CertificateChainUntrusted(
            f"the certificate expired on {leaf.not_valid_after_utc.isoformat()}"
        )
    leaf_print = fingerprint(leaf)
    seen = {leaf_print}
    intermediates = []
    for cert in certs:
        print_ = fingerprint(cert)
        if print_ not in seen:
            seen.add(print_)
            intermediates.append(cert)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=_ca_policy(anchors),
            # The leaf's profile was checked above (codeSigning, not a CA, KU).
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except verification.VerificationError as e:
        raise CertificateChainUntrusted(
            f"the chain does not lead to one of the connector's trusted roots: {str(e)[:300]}"
        ) from None
    return tuple(verified.chain)
