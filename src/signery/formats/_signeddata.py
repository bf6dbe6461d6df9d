"""CMS SignedData (RFC 5652) with a remote key: the one builder behind the cms,
authenticode and jar formats.

The format decides what is digested and where the result goes; this module builds
the signed attributes, asks the Signer for the signature of their digest,
checks that signature against the certificate it names (verify-after-sign on the
build machine too: a key rotated between listing and signing, or a faulty
server, never leaves a bad signature in an artifact), optionally asks a TSA for a
timestamp over the signature value, and encodes the SignedData with asn1crypto.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# tsp registers id-ct-TSTInfo and the ESS attributes with asn1crypto's cms module.
from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]  # noqa: F401
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signery.crypto import Hashed, PublicKey, check_scheme, hash_bytes, verify_signature
from signery.errors import ClientError
from signery.formats._base import Signer, SignOptions, Timestamper
from signery.protocol import DigestAlgorithm, SignatureScheme

# RFC 3161 Appendix A / RFC 5652 §11: the unsigned attribute that carries a
# timestamp token over the SignerInfo's signature value.
ID_AA_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
_DIGEST_NAMES = {
    DigestAlgorithm.SHA256: "sha256",
    DigestAlgorithm.SHA384: "sha384",
    DigestAlgorithm.SHA512: "sha512",
}
_ECDSA_NAMES = {
    DigestAlgorithm.SHA256: "sha256_ecdsa",
    DigestAlgorithm.SHA384: "sha384_ecdsa",
    DigestAlgorithm.SHA512: "sha512_ecdsa",
}
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)


class CertificateRequired(ClientError):
    code = "certificate_required"
    title = "This format needs a key with a certificate"


class FormatSchemeUnsupported(ClientError):
    code = "format_scheme_unsupported"
    title = "This format does not accept the signature scheme"


class KeyChangedWhileSigning(ClientError):
    code = "key_changed_while_signing"
    title = "The key's certificate changed while signing; sign again"


class _ExplicitContentInfo(core.Sequence):  # type: ignore[misc]
    """EncapsulatedContentInfo whose eContent is the content itself ([0] EXPLICIT
    SEQUENCE), not an OCTET STRING: what Authenticode requires
    (SpcIndirectDataContent). Declared as a SEQUENCE: asn1crypto 1.5 drops the
    explicit tag of a field declared ANY."""

    _fields = [
        ("content_type", cms.ContentType),
        ("content", core.Sequence, {"explicit": 0, "optional": True}),
    ]


class _SignedDataExplicit(cms.SignedData):  # type: ignore[misc]
    # asn1crypto picks encap_content_info's class by the version (PKCS#7 vs CMS);
    # here it is always the explicit form.
    _spec_callbacks = None
    _fields = [
        (name, _ExplicitContentInfo if name == "encap_content_info" else spec, *rest)
        for name, spec, *rest in cms.SignedData._fields
    ]


class _ContentInfoExplicit(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("content_type", cms.ContentType),
        ("content", _SignedDataExplicit, {"explicit": 0}),
    ]


@dataclass(frozen=True, slots=True)
class SignedDataResult:
    """The encoded ContentInfo and what went into it."""

    der: bytes
    digest_algorithm: DigestAlgorithm
    scheme: SignatureScheme
    key_version: int
    timestamped: bool


def signing_certificate(signer: Signer, format_name: str) -> x509.Certificate:
    """The key's leaf certificate, or a clear refusal before anything is sent."""
    if not signer.certificate_chain:
        raise CertificateRequired(
            f"{format_name} signatures name the signer by its certificate; key "
            f"{signer.key_name!r} has none (create it with --ca builtin or a connector)"
        )
    return signer.certificate_chain[0]


@dataclass(frozen=True, slots=True)
class SignedDataSpec:
    """What a format puts into its SignedData, apart from the digest it signs.

    One constant per format (cms, authenticode, jar): the choices that differ
    between them, named, instead of a dozen keyword arguments at each call."""

    format_name: str
    """Named in refusals ("jar signatures name the signer by its certificate...")."""
    content_type: str = "data"
    """The eContentType, also the signed content-type attribute (RFC 5652 §11.1)."""
    extra_signed_attributes: tuple[bytes, ...] = ()
    """DER Attributes signed along with the standard ones (Authenticode's
    SpcSpOpusInfo and SpcStatementType)."""
    signing_time: bool = True
    """Add the signing-time attribute (RFC 5652 §11.3), from ``SignOptions.signing_time``."""
    algorithm_protection: bool = True
    """Add CMSAlgorithmProtection (RFC 6211); Windows' Authenticode verifier does not know it."""
    timestamp_attribute: str = ID_AA_TIMESTAMP_TOKEN
    """The unsigned attribute a timestamp token goes into (RFC 3161 Appendix A,
    or Microsoft's own OID for Authenticode)."""
    version: str = "v1"
    """The SignedData version (RFC 5652 §5.1)."""
    allow_pss: bool = True
    """The format's verifiers accept RSA-PSS (Authenticode's do not)."""
    allow_pss_with_timestamp: bool = False
    """The format's verifier accepts a PSS signature carrying a token from a
    non-PSS TSA (plain CMS: ``openssl cms -verify`` does not look at unsigned
    attributes, and ``openssl ts -verify`` checks the token's own signature,
    made by the TSA key, not the signer's)."""


def choose(
    signer: Signer, options: SignOptions, spec: SignedDataSpec
) -> tuple[DigestAlgorithm, SignatureScheme]:
    """The digest and scheme for this signature, refused before anything is sent
    when the format cannot carry them (Authenticode and timestamps refuse PSS,
    unless ``spec`` allows it)."""
    digest = options.digest_algorithm or signer.default_digest
    scheme = options.scheme or signer.default_scheme
    check_scheme(signer.algorithm, scheme)  # e.g. PSS for an EC key: refused here, not remotely
    timestamp_refused = options.timestamper is not None and not spec.allow_pss_with_timestamp
    if scheme is SignatureScheme.RSA_PSS and (not spec.allow_pss or timestamp_refused):
        raise FormatSchemeUnsupported(
            f"{spec.format_name}{' with a timestamp' if spec.allow_pss else ''} does not accept "
            "RSA-PSS (its verifiers refuse it); use rsa-pkcs1v15"
        )
    return digest, scheme


def signature_algorithm(scheme: SignatureScheme, digest: DigestAlgorithm) -> dict[str, Any]:
    """The SignerInfo signatureAlgorithm (RFC 3370 §3.2, RFC 4056 §2, RFC 5758 §3.2)."""
    if scheme is SignatureScheme.RSA_PKCS1V15:
        return {"algorithm": "rsassa_pkcs1v15"}
    if scheme is SignatureScheme.RSA_PSS:
        name = _DIGEST_NAMES[digest]
        return {
            "algorithm": "rsassa_pss",
            "parameters": {
                "hash_algorithm": {"algorithm": name},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": name}},
                # The server's PSS salt is as long as the digest (signery.crypto).
                "salt_length": digest.size,
                "trailer_field": "trailer_field_bc",
            },
        }
    return {"algorithm": _ECDSA_NAMES[digest]}


def build_signed_data(
    signer: Signer,
    options: SignOptions,
    spec: SignedDataSpec,
    message_digest: Hashed,
    *,
    content: bytes | None = None,
) -> SignedDataResult:
    """A ContentInfo holding a SignedData with one SignerInfo by ``signer``, shaped by ``spec``.

    ``message_digest`` is the digest of what the signature covers (the file for a
    detached CMS, the SpcIndirectDataContent contents for Authenticode, the .SF
    file for a JAR), computed by the format with the digest algorithm chosen here
    (``choose``). ``content`` (the DER of a SEQUENCE) is embedded as [0] EXPLICIT when given;
    otherwise the SignedData is detached."""
    leaf = signing_certificate(signer, spec.format_name)
    digest, scheme = choose(signer, options, spec)
    if message_digest.algorithm is not digest:
        raise ValueError("message_digest must use the digest algorithm choose() returned")
    der = serialization.Encoding.DER
    certificates = [
        asn1_x509.Certificate.load(c.public_bytes(der)) for c in signer.certificate_chain
    ]
    digest_algorithm = cms.DigestAlgorithm({"algorithm": _DIGEST_NAMES[digest]})
    sig_algorithm = cms.SignedDigestAlgorithm(signature_algorithm(scheme, digest))

    attributes: list[Any] = [
        cms.CMSAttribute({"type": "content_type", "values": [spec.content_type]}),
        cms.CMSAttribute({"type": "message_digest", "values": [message_digest.digest]}),
    ]
    if spec.signing_time:
        now = (options.signing_time or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        # RFC 5652 §11.3: UTCTime through 2049, GeneralizedTime after.
        time = cms.Time(name="utc_time" if now.year < 2050 else "generalized_time", value=now)
        attributes.append(cms.CMSAttribute({"type": "signing_time", "values": [time]}))
    if spec.algorithm_protection:
        # RFC 6211: binds the digest and signature algorithms into what is signed.
        attributes.append(
            cms.CMSAttribute(
                {
                    "type": "cms_algorithm_protection",
                    "values": [
                        {"digest_algorithm": digest_algorithm, "signature_algorithm": sig_algorithm}
                    ],
                }
            )
        )
    attributes.extend(cms.CMSAttribute.load(a) for a in spec.extra_signed_attributes)
    signed_attrs = cms.CMSAttributes(attributes)
    # RFC 5652 §5.4: the signature covers the DER of the attributes as a SET OF
    # (tag 0x31), not their [0] IMPLICIT form in the SignerInfo.
    to_sign = hash_bytes(signed_attrs.dump(), digest)
    options.check_interrupted()
    response = signer.sign_detailed(to_sign, scheme)
    check_signature(signer, leaf, response.certificate_chain, to_sign, scheme, response.signature)

    unsigned: list[Any] = []
    if options.timestamper is not None:
        options.check_interrupted()  # no request to the TSA either
        token = timestamp_token(options.timestamper, response.signature, digest)
        unsigned.append(cms.CMSAttribute({"type": spec.timestamp_attribute, "values": [token]}))
    signer_info: dict[str, Any] = {
        "version": "v1",  # RFC 5652 §5.3: v1 with issuerAndSerialNumber
        "sid": cms.SignerIdentifier(
            name="issuer_and_serial_number",
            value={"issuer": certificates[0].issuer, "serial_number": leaf.serial_number},
        ),
        "digest_algorithm": digest_algorithm,
        "signed_attrs": signed_attrs,
        "signature_algorithm": sig_algorithm,
        "signature": response.signature,
    }
    if unsigned:
        signer_info["unsigned_attrs"] = cms.CMSAttributes(unsigned)
    signed_data: dict[str, Any] = {
        "version": spec.version,
        "digest_algorithms": [digest_algorithm],
        "encap_content_info": {"content_type": spec.content_type},
        "certificates": [cms.CertificateChoices(name="certificate", value=c) for c in certificates],
        "signer_infos": [signer_info],
    }
    if content is None:
        info = cms.ContentInfo({"content_type": "signed_data", "content": signed_data})
    else:
        signed_data["encap_content_info"] = {
            "content_type": spec.content_type,
            "content": core.Sequence.load(content),
        }
        info = _ContentInfoExplicit({"content_type": "signed_data", "content": signed_data})
    return SignedDataResult(
        bytes(info.dump()), digest, scheme, response.key_version, bool(unsigned)
    )


def check_signature(
    signer: Signer,
    leaf: x509.Certificate,
    response_chain: Sequence[str],
    hashed: Hashed,
    scheme: SignatureScheme,
    signature: bytes,
) -> None:
    """The signature must verify with the certificate the SignerInfo names."""
    if response_chain:
        answered = x509.load_pem_x509_certificate(response_chain[0].encode("ascii"))
        if answered != leaf:
            raise KeyChangedWhileSigning(
                f"key {signer.key_name!r} has a new certificate since it was listed"
            )
    public = leaf.public_key()
    if not verify_signature(public, hashed, scheme, signature):  # type: ignore[arg-type]
        raise KeyChangedWhileSigning(
            f"the signature from key {signer.key_name!r} does not verify with its certificate"
        )


def timestamp_token(timestamper: Timestamper, signature: bytes, digest: DigestAlgorithm) -> Any:
    """The TSA's token over the signature value (RFC 3161 Appendix A), as a
    ContentInfo ready to be an attribute value."""
    token = timestamper(hash_bytes(signature, digest))
    try:
        return cms.ContentInfo.load(token)
    except _DECODE_ERRORS:
        raise ClientError("the TSA's token is not a CMS ContentInfo") from None


# ------------------------------------------------------------------ verification


@dataclass(frozen=True, slots=True)
class SignerCheck:
    """What verifying one SignedData found."""

    valid: bool
    detail: str
    message_digest: bytes | None = None
    digest_algorithm: DigestAlgorithm | None = None
    timestamped: bool = False


def parse_content_info(der: bytes) -> Any:
    """A ContentInfo holding a SignedData, or ClientError."""
    try:
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise ValueError("not SignedData")
        for signer_info in info["content"]["signer_infos"]:
            _parse_now(signer_info)
    except _DECODE_ERRORS:
        raise ClientError("not a CMS SignedData (RFC 5652)") from None
    return info


_SIGNER_INFO_FIELDS = (
    "version",
    "sid",
    "digest_algorithm",
    "signed_attrs",
    "signature_algorithm",
    "signature",
)


def _parse_now(signer_info: Any) -> None:
    """Decode a SignerInfo now, so that malformed input fails here, not later.

    Field by field: ``.native`` on the whole SignerInfo is quadratic in asn1crypto
    1.5 through nested SET OFs (about a second for one timestamp token)."""
    for field in _SIGNER_INFO_FIELDS:
        signer_info[field].native  # noqa: B018
    unsigned = signer_info["unsigned_attrs"]
    if not isinstance(unsigned, core.Void):
        for attribute in unsigned:
            attribute["type"].native  # noqa: B018
            for value in attribute["values"]:
                value.native  # noqa: B018


def check_signer(signed_data: Any, public_keys: Sequence[PublicKey]) -> SignerCheck:
    """Verify the first SignerInfo's signature over its signed attributes with one of
    ``public_keys``; the caller compares ``message_digest`` with the content's."""
    try:
        info = signed_data["signer_infos"][0]
        digest = DigestAlgorithm(info["digest_algorithm"]["algorithm"].native)
        attrs = info["signed_attrs"]
        found = {a["type"].native: a["values"][0].native for a in attrs}
        message_digest = found["message_digest"]
        algorithm = info["signature_algorithm"]
        name = algorithm["algorithm"].native
        scheme = (
            SignatureScheme.RSA_PSS
            if name == "rsassa_pss"
            else SignatureScheme.ECDSA
            if name.endswith("_ecdsa") or name == "ecdsa"
            else SignatureScheme.RSA_PKCS1V15
        )
        signature = info["signature"].native
        # Re-encode as SET OF: what was signed (RFC 5652 §5.4).
        covered = cms.CMSAttributes.load(attrs.untag().dump()).dump()
        unsigned = info["unsigned_attrs"]
        # Not unsigned.native: that would decode every nested signature (Authenticode
        # SPC_NESTED_SIGNATURE), which asn1crypto cannot do generically, and slowly.
        timestamped = not isinstance(unsigned, core.Void) and any(
            a["type"].dotted in (ID_AA_TIMESTAMP_TOKEN, "1.3.6.1.4.1.311.3.3.1") for a in unsigned
        )
    except (*_DECODE_ERRORS, AttributeError):
        return SignerCheck(False, "the SignerInfo is malformed or lacks signed attributes")
    hashed = hash_bytes(covered, digest)
    for index, key in enumerate(public_keys):
        if verify_signature(key, hashed, scheme, signature):
            return SignerCheck(
                True,
                f"signature valid ({scheme.value}, {digest.value}, key #{index + 1})",
                message_digest,
                digest,
                timestamped,
            )
    return SignerCheck(False, "the signature does not verify with the key", message_digest, digest)


__all__ = [
    "ID_AA_TIMESTAMP_TOKEN",
    "CertificateRequired",
    "FormatSchemeUnsupported",
    "KeyChangedWhileSigning",
    "SignedDataResult",
    "SignedDataSpec",
    "SignerCheck",
    "build_signed_data",
    "check_signature",
    "check_signer",
    "choose",
    "parse_content_info",
    "signature_algorithm",
    "signing_certificate",
    "timestamp_token",
]
