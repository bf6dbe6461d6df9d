"""The built-in time-stamping authority (RFC 3161): ``POST /api/v1/tsa``.

A TSA key lives in a key store like every other key; its certificate is issued by
the built-in issuing CA through the same remote-key mechanism as the CA's own
certificates, with timeStamping as its only extended key usage, marked critical
(RFC 3161 §2.3). The authority is a ``ca_authorities`` row with role ``tsa``,
made by ``signery init`` or, for installations initialized before the TSA
existed, on first use (the unique ``role`` column settles a race between workers).

A query becomes a :class:`TimestampQuery` only after full validation; a query that
fails is answered with a ``TimeStampResp`` whose ``PKIStatusInfo`` is a rejection
with the ``failInfo`` of RFC 3161 §2.4.2. A granted token is CMS ``SignedData``
(RFC 5652) v3 over ``id-ct-TSTInfo``, whose signed attributes carry contentType,
messageDigest, signingTime, ESS signingCertificateV2 (RFC 5816, required by
``openssl ts -verify``) and CMS algorithm protection (RFC 6211). The signature is
PKCS#1 v1.5 or ECDSA, never PSS: ``openssl ts -verify`` and rfc3161-client refuse
PSS tokens. The DER is built with asn1crypto, never by hand.

Every answer is audited before it leaves (fail closed, like signing): a token only
after its ``tsa.timestamp.issued`` event and usage count are committed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio.to_thread
from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select

from signery.crypto import (
    Hashed,
    default_digest,
    default_scheme,
    hash_bytes,
    verify_signature,
)
from signery.errors import (
    ConfigurationError,
    DigestLengthMismatch,
    ImprintLengthMismatch,
    MalformedTimestampQuery,
    RateLimited,
    SignatureVerificationFailed,
    SigneryError,
    TimestampQueryRejected,
    TsaAlreadyProvisioned,
    TsaUnavailable,
    UnacceptedTimestampExtension,
    UnacceptedTimestampPolicy,
    UnknownKeyStore,
    UnsupportedImprintAlgorithm,
    UnsupportedMediaType,
    UnsupportedTimestampQueryVersion,
)
from signery.keystores import (
    Destroyable,
    KeyContext,
    KeyHandle,
    KeyStoreRegistry,
    remote_private_key,
)
from signery.protocol import Algorithm, AuditOutcome, DigestAlgorithm, SignatureScheme
from signery.rfc3161 import QUERY_MEDIA_TYPE, TimeStampResp
from signery.server.audit.recorder import (
    ANONYMOUS,
    SYSTEM,
    Actor,
    AuditRecord,
    AuditRecorder,
    Counted,
    EventKind,
    UsageDelta,
    outcome_of,
)
from signery.server.ca.models import CaAuthorityRow
from signery.server.ca.service import (
    BACKDATE,
    ISSUING,
    ROOT,
    Authority,
    CreatedCa,
    random_serial,
    signature_hash,
    with_revocation_pointers,
)
from signery.server.config import Settings, TsaAccess
from signery.server.identity.context import RequestContext, source_of
from signery.server.persistence import meta
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow

TSA = "tsa"
"""The ``ca_authorities.role`` of the time-stamping authority."""

# A query is a hash and a few small fields (~60-130 bytes from openssl); anything
# near this is not a timestamp query, and is refused before it is read (413).
MAX_QUERY_BYTES = 8 * 1024
TSA_VALIDITY = timedelta(days=10 * 365)
# Rate-limit buckets kept per process; beyond this the least recently seen
# client is forgotten (it gets a full bucket again: the limit fails open for it,
# never closed for anybody else).
MAX_TRACKED_CLIENTS = 65_536
# A client over its rate has one refusal audited per this many seconds; the event
# counts the refusals in between (all of them show in signery_http_requests_total).
REFUSAL_AUDIT_INTERVAL = 60.0

# RFC 3161 §2.4.1 and RFC 5754 §2: the imprints this TSA timestamps, by OID. Matched
# on the dotted OID: asn1crypto's names are ambiguous (it calls HMAC-SHA1 "sha1").
IMPRINT_ALGORITHMS: dict[str, DigestAlgorithm] = {
    "2.16.840.1.101.3.4.2.1": DigestAlgorithm.SHA256,
    "2.16.840.1.101.3.4.2.2": DigestAlgorithm.SHA384,
    "2.16.840.1.101.3.4.2.3": DigestAlgorithm.SHA512,
}
# asn1crypto's names for the ECDSA signature algorithms (RFC 5758 §3.2: no parameters).
_ECDSA_ALGORITHMS = {
    DigestAlgorithm.SHA256: "sha256_ecdsa",
    DigestAlgorithm.SHA384: "sha384_ecdsa",
    DigestAlgorithm.SHA512: "sha512_ecdsa",
}
# Errors asn1crypto raises on malformed input (it parses lazily, on field access).
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)
# UTCTime covers 1950-2049; RFC 5652 §11.3 wants GeneralizedTime outside it.
_UTC_TIME_END = 2050


# ------------------------------------------------------------------ rejections


# ------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class TsaConfig:
    """The TSA's settings (see ``tsa_*`` in signery.server.config)."""

    policy: str
    accuracy_seconds: int
    rate_limit_per_minute: int
    algorithm: Algorithm
    storage: str
    organization: str
    access: TsaAccess = TsaAccess.PUBLIC
    public_url: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> TsaConfig:
        return cls(
            policy=settings.tsa_policy_oid,
            accuracy_seconds=settings.tsa_accuracy_seconds,
            rate_limit_per_minute=settings.tsa_rate_limit_per_minute,
            algorithm=settings.tsa_algorithm,
            # By default the TSA key lives where the CA keys do: an operator who
            # put the CA in an HSM expects the TSA there too.
            storage=settings.tsa_storage or settings.ca_storage,
            organization=settings.ca_organization,
            access=settings.tsa_access,
            public_url=settings.public_url,
        )


@dataclass(frozen=True, slots=True)
class TimestampQuery:
    """A fully validated TimeStampReq (RFC 3161 §2.4.1)."""

    imprint: Hashed
    imprint_der: bytes  # the MessageImprint, DER, echoed into TSTInfo (§2.4.2)
    nonce: int | None
    cert_req: bool
    policy: str | None


@dataclass(frozen=True, slots=True)
class TimestampAuthority:
    """The TSA as loaded from its row: key handle, certificate and chain."""

    id: str
    tsg_id: str
    tsg_path: str
    algorithm: Algorithm
    handle: KeyHandle
    certificate: x509.Certificate
    issuing: x509.Certificate
    root: x509.Certificate

    @property
    def chain_pem(self) -> str:
        """TSA certificate, issuing CA, root CA (PEM), for verifiers."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in (self.certificate, self.issuing, self.root)
        )


@dataclass(frozen=True, slots=True)
class ProvisionedTsa:
    """A new TSA key and certificate, and the row for the caller's transaction."""

    row: CaAuthorityRow
    handle: KeyHandle
    certificate: x509.Certificate


# ------------------------------------------------------------------ query parsing


class _AlgorithmIdentifier(core.Sequence):  # type: ignore[misc]
    """RFC 5280 §4.1.1.2 AlgorithmIdentifier with its parameters as written:
    asn1crypto's DigestAlgorithm forces NULL parameters onto SHA-2 identifiers,
    where RFC 5754 §2 allows absent or NULL and nothing else."""

    _fields = [
        ("algorithm", core.ObjectIdentifier),
        ("parameters", core.Any, {"optional": True}),
    ]


class _MessageImprint(core.Sequence):  # type: ignore[misc]
    _fields = [("hash_algorithm", _AlgorithmIdentifier), ("hashed_message", core.OctetString)]


_DER_NULL = b"\x05\x00"


def parse_query(der: bytes, *, policy: str) -> TimestampQuery:
    """A DER TimeStampReq -> TimestampQuery, or a TimestampQueryRejected with the
    failInfo RFC 3161 §2.4.2 assigns (checked in ``openssl ts -reply``'s order:
    format, version, algorithm, imprint length, policy, extensions)."""
    try:
        req = tsp.TimeStampReq.load(der, strict=True)  # strict: no trailing bytes
        version = req["version"].native
        imprint = req["message_imprint"]
        algorithm = _AlgorithmIdentifier.load(imprint["hash_algorithm"].dump(), strict=True)
        oid = str(algorithm["algorithm"].dotted)
        parameters = algorithm["parameters"]
        null_parameters = not isinstance(parameters, core.Void)
        well_formed_parameters = not null_parameters or parameters.dump() == _DER_NULL
        digest = imprint["hashed_message"].native
        req_policy = req["req_policy"]
        requested_policy = None if isinstance(req_policy, core.Void) else str(req_policy.dotted)
        nonce = req["nonce"].native
        cert_req = req["cert_req"].native
        extensions = req["extensions"]
        has_extensions = not isinstance(extensions, core.Void) and len(extensions) > 0
    except _DECODE_ERRORS as e:
        raise MalformedTimestampQuery(
            f"the body is not a DER TimeStampReq (RFC 3161 section 2.4.1): {type(e).__name__}"
        ) from None
    if not isinstance(digest, bytes) or not isinstance(cert_req, bool):
        raise MalformedTimestampQuery("the body is not a TimeStampReq (RFC 3161 section 2.4.1)")
    if version != "v1":
        raise UnsupportedTimestampQueryVersion(f"version {version} is not supported; use 1")
    digest_algorithm = IMPRINT_ALGORITHMS.get(oid)
    if digest_algorithm is None:
        raise UnsupportedImprintAlgorithm(
            f"hash algorithm {oid[:64]} is not accepted; use SHA-256, SHA-384 or SHA-512"
        )
    if not well_formed_parameters:
        # RFC 5754 §2: SHA-2 identifiers have absent or NULL parameters.
        raise UnsupportedImprintAlgorithm("the hash algorithm has parameters other than NULL")
    try:
        hashed = Hashed(digest_algorithm, digest)
    except DigestLengthMismatch:
        raise ImprintLengthMismatch(
            f"a {digest_algorithm.value} imprint has {digest_algorithm.size} bytes, "
            f"got {len(digest)}"
        ) from None
    if requested_policy is not None and requested_policy != policy:
        raise UnacceptedTimestampPolicy(
            f"policy {requested_policy[:64]} is not offered; this TSA issues under {policy}"
        )
    if has_extensions:
        # RFC 3161 §2.4.1: an extension the TSA does not recognize, critical or not,
        # is refused with unacceptedExtension. This TSA recognizes none.
        raise UnacceptedTimestampExtension("request extensions are not supported")
    # RFC 3161 §2.4.2: TSTInfo's messageImprint has the same value as the query's:
    # the same algorithm, parameters absent or NULL as sent, the same hash; in DER.
    hash_algorithm: dict[str, Any] = {"algorithm": oid}
    if null_parameters:
        hash_algorithm["parameters"] = core.Null()
    echoed = _MessageImprint({"hash_algorithm": hash_algorithm, "hashed_message": digest})
    return TimestampQuery(
        imprint=hashed,
        imprint_der=bytes(echoed.dump()),
        nonce=nonce if isinstance(nonce, int) else None,
        cert_req=cert_req,
        policy=requested_policy,
    )


# ------------------------------------------------------------------ replies


def rejection_reply(error: TimestampQueryRejected) -> bytes:
    """A TimeStampResp with status rejection, a statusString and the failInfo bit."""
    # PKIFreeText is UTF-8, but `openssl ts -reply -text` prints it byte by byte:
    # keep it ASCII so that every client shows it as written.
    text = error.detail[:256].encode("ascii", "replace").decode("ascii")
    reply = TimeStampResp(
        {
            "status": {
                "status": "rejection",
                "status_string": [text],
                "fail_info": {error.failure.value},
            }
        }
    )
    return bytes(reply.dump())


# asn1crypto 1.5.1 takes any encoded value whose cached header ends in 0x80 - also
# every definite long-form length of 128 + 256k bytes - for indefinite-length BER
# and re-encodes its whole subtree on the next dump (wbond/asn1crypto#249, open),
# and a structure built from nested values dumps each child twice: a token built
# as one nested value cost 3 ms of CPU, and 70-150 ms for one token in four
# (measured). So every structure here is built from parts that are each encoded
# exactly once (_frozen / _part): a value that holds only its contents, no children
# and no header, is never re-encoded. The bytes are the same DER either way.


def _frozen(value: Any) -> Any:
    """``value`` encoded once, as a value of its class holding only its contents.
    Reads ``contents`` once (each child dumped once), never calls ``dump()`` twice."""
    return type(value)(contents=value.contents)


def _part(cls: Any, der: bytes) -> Any:
    """The DER value ``der`` as a ``cls`` value holding only its contents."""
    return cls(contents=cls.load(der).contents)


def _der(value: Any) -> bytes:
    """The DER of a value built by _frozen or _part (or a primitive)."""
    return bytes(value.dump())


class TokenBuilder:
    """Makes TimeStampTokens for one TSA. Holds only public material (certificates
    and constant attributes, as DER), never a key: signatures come from ``sign``."""

    def __init__(self, tsa: TimestampAuthority) -> None:
        self.digest = default_digest(tsa.algorithm)
        # PKCS#1 v1.5 or ECDSA, never PSS (refused by openssl ts -verify and rfc3161-client).
        self.scheme = default_scheme(tsa.algorithm)
        assert self.scheme is not SignatureScheme.RSA_PSS
        self._public_key = _rsa_or_ec(tsa.certificate.public_key())
        der = serialization.Encoding.DER
        cert = _part(asn1_x509.Certificate, tsa.certificate.public_bytes(der))
        issuing = _part(asn1_x509.Certificate, tsa.issuing.public_bytes(der))
        # Name is a CHOICE of one alternative: its RDNSequence is the part.
        issuer = asn1_x509.Name(
            name="", value=_part(asn1_x509.RDNSequence, tsa.certificate.issuer.public_bytes())
        )
        serial = tsa.certificate.serial_number
        self._issuer_and_serial = _der(
            _frozen(cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": serial}))
        )
        # RFC 3161 §2.4.1: with certReq the TSA certificate MUST be present (and
        # without it the certificates field MUST NOT be). The issuing CA is added so
        # that a verifier holding only the root can build the path; the root itself
        # is left out: a trust anchor must come from the verifier.
        self._certificates = _der(
            _frozen(
                cms.CertificateSet(
                    [
                        cms.CertificateChoices(name="certificate", value=cert),
                        cms.CertificateChoices(name="certificate", value=issuing),
                    ]
                )
            )
        )
        # RFC 5652 §10.1.1 / RFC 5754 §2 digest algorithm; RFC 3370 §3.2: the RSA
        # signatureAlgorithm is rsaEncryption with NULL parameters (asn1crypto adds
        # them), RFC 5758 §3.2: ECDSA ones have none.
        digest_algorithm = _frozen(cms.DigestAlgorithm({"algorithm": self.digest.value}))
        signature_algorithm = _frozen(
            cms.SignedDigestAlgorithm(
                {"algorithm": "rsassa_pkcs1v15"}
                if tsa.algorithm.is_rsa
                else {"algorithm": _ECDSA_ALGORITHMS[self.digest]}
            )
        )
        self._digest_algorithm = _der(digest_algorithm)
        self._signature_algorithm = _der(signature_algorithm)
        self._digest_algorithms = _der(_frozen(cms.DigestAlgorithms([digest_algorithm])))
        # RFC 5652 §11.1: contentType, required with signed attributes.
        self._content_type = _der(
            _frozen(cms.CMSAttribute({"type": "content_type", "values": ["tst_info"]}))
        )
        # RFC 5816 §2.2.1 / RFC 5035 §5.4.1.1: ESSCertIDv2 with SHA-256, the default
        # hashAlgorithm, therefore omitted (DER); issuerSerial binds the certificate.
        ess_cert_id = _frozen(
            tsp.ESSCertIDv2(
                {
                    "cert_hash": tsa.certificate.fingerprint(hashes.SHA256()),
                    "issuer_serial": _frozen(
                        tsp.IssuerSerial(
                            {
                                "issuer": _frozen(
                                    asn1_x509.GeneralNames(
                                        [asn1_x509.GeneralName(name="directory_name", value=issuer)]
                                    )
                                ),
                                "serial_number": serial,
                            }
                        )
                    ),
                }
            )
        )
        signing_certificate = _frozen(
            tsp.SigningCertificateV2({"certs": _frozen(tsp.ESSCertIDv2s([ess_cert_id]))})
        )
        self._ess = _der(
            _frozen(
                cms.CMSAttribute(
                    {
                        "type": "signing_certificate_v2",
                        "values": _frozen(tsp.SetOfSigningCertificatesV2([signing_certificate])),
                    }
                )
            )
        )
        # RFC 6211: binds both algorithms into what is signed; each MUST equal the
        # SignerInfo's own.
        protection = _frozen(
            cms.CMSAlgorithmProtection(
                {"digest_algorithm": digest_algorithm, "signature_algorithm": signature_algorithm}
            )
        )
        self._protection = _der(
            _frozen(
                cms.CMSAttribute(
                    {
                        "type": "cms_algorithm_protection",
                        "values": _frozen(cms.SetOfCMSAlgorithmProtection([protection])),
                    }
                )
            )
        )

    def build(
        self,
        query: TimestampQuery,
        *,
        serial: int,
        gen_time: datetime,
        policy: str,
        accuracy_seconds: int,
        sign: Callable[[Hashed], bytes],
    ) -> bytes:
        """The TimeStampToken (ContentInfo, DER) for ``query``, signed by ``sign``."""
        fields: dict[str, Any] = {
            "version": "v1",
            "policy": policy,
            "message_imprint": _part(tsp.MessageImprint, query.imprint_der),
            "serial_number": serial,
            "gen_time": gen_time,
            "accuracy": _frozen(tsp.Accuracy({"seconds": accuracy_seconds})),
        }
        if query.nonce is not None:
            fields["nonce"] = query.nonce  # RFC 3161 §2.4.2: MUST be echoed
        # ordering is absent (DEFAULT FALSE), and so is the optional tsa name.
        tst_info = _der(_frozen(tsp.TSTInfo(fields)))
        signing_time = cms.Time(
            name="utc_time" if gen_time.year < _UTC_TIME_END else "generalized_time",
            value=gen_time,
        )
        message_digest = hash_bytes(tst_info, self.digest).digest
        attributes = _frozen(
            cms.CMSAttributes(
                [
                    _part(cms.CMSAttribute, self._content_type),
                    _frozen(
                        cms.CMSAttribute({"type": "message_digest", "values": [message_digest]})
                    ),
                    _frozen(cms.CMSAttribute({"type": "signing_time", "values": [signing_time]})),
                    _part(cms.CMSAttribute, self._ess),
                    _part(cms.CMSAttribute, self._protection),
                ]
            )
        )
        # RFC 5652 §5.4: the signature covers the DER of the attributes as a SET OF
        # (tag 0x31), not their [0] IMPLICIT encoding in SignerInfo; both carry the
        # same contents. asn1crypto sorts a SET OF's elements as DER requires, so
        # verifiers that re-encode the attributes (OpenSSL does) get these bytes.
        to_sign = _der(attributes)
        hashed = hash_bytes(to_sign, self.digest)
        signature = sign(hashed)
        # Verify-after-sign: a faulty store must not put a bad token into the world.
        if not verify_signature(self._public_key, hashed, self.scheme, signature):
            raise SignatureVerificationFailed()
        signer_info = _frozen(
            cms.SignerInfo(
                {
                    "version": "v1",  # RFC 5652 §5.3: v1 with issuerAndSerialNumber
                    "sid": cms.SignerIdentifier(
                        name="issuer_and_serial_number",
                        value=_part(cms.IssuerAndSerialNumber, self._issuer_and_serial),
                    ),
                    "digest_algorithm": _part(cms.DigestAlgorithm, self._digest_algorithm),
                    "signed_attrs": attributes,
                    "signature_algorithm": _part(
                        cms.SignedDigestAlgorithm, self._signature_algorithm
                    ),
                    "signature": signature,
                }
            )
        )
        signed_data: dict[str, Any] = {
            # RFC 5652 §5.1: version 3 because eContentType is not id-data.
            "version": "v3",
            "digest_algorithms": _part(cms.DigestAlgorithms, self._digest_algorithms),
            "encap_content_info": _frozen(
                cms.EncapsulatedContentInfo(
                    {
                        "content_type": "tst_info",
                        # RFC 3161 §2.4.2: the DER TSTInfo inside an OCTET STRING.
                        "content": core.ParsableOctetString(tst_info),
                    }
                )
            ),
            "signer_infos": _frozen(cms.SignerInfos([signer_info])),
        }
        if query.cert_req:
            signed_data["certificates"] = _part(cms.CertificateSet, self._certificates)
        content = _frozen(cms.SignedData(signed_data))
        return _der(_frozen(cms.ContentInfo({"content_type": "signed_data", "content": content})))


def granted_reply(token: bytes) -> bytes:
    """A TimeStampResp with status granted and the token."""
    reply = TimeStampResp(
        {"status": {"status": "granted"}, "time_stamp_token": _part(cms.ContentInfo, token)}
    )
    return _der(_frozen(reply))


# ------------------------------------------------------------------ provisioning


def authority_of(row: CaAuthorityRow) -> Authority:
    """The CA authority a ``ca_authorities`` row describes (as BuiltinCa loads it)."""
    algorithm = Algorithm(row.algorithm)
    return Authority(
        role=row.role,
        algorithm=algorithm,
        handle=KeyHandle(row.storage, row.store_ref, algorithm, KeyContext(row.id, 1, row.tsg_id)),
        certificate=x509.load_der_x509_certificate(row.certificate_der),
    )


def _rsa_or_ec(key: object) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigurationError("CA and TSA keys must be RSA or EC")
    return key


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
        public_key = _rsa_or_ec(key.public_key)
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
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # digitalSignature, and nonRepudiation (contentCommitment) as TSAs
                # customarily assert; OpenSSL's timestamp purpose allows only these two.
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # RFC 3161 §2.3: the TSA's certificate MUST contain exactly one EKU,
            # id-kp-timeStamping, and the extension MUST be critical.
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(_rsa_or_ec(issuer.public_key())),
                critical=False,
            )
        )
        # The TSA certificate is revocable like a code-signing one: its CRL and
        # issuer are where a verifier checking the token's chain looks for them.
        certificate = with_revocation_pointers(builder, config.public_url).sign(
            remote_private_key(
                keystores.get(issuing.handle.store),
                issuing.handle,
                _rsa_or_ec(issuer.public_key()),
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


# ------------------------------------------------------------------ rate limit


@dataclass(frozen=True, slots=True)
class RateRefusal:
    """A request the rate limit refused."""

    retry_after: float  # seconds until the client has a token again
    audit: bool  # the first refusal of this client in its audit interval
    unaudited: int  # refusals of this client since its last audited one, not audited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float
    audited_at: float | None = None
    unaudited: int = 0


class ClientRateLimiter:
    """A token bucket per client, in this process's memory.

    Per process and per replica: with N workers or replicas behind a balancer a
    client may get up to N times the configured rate. That bounds abuse of an
    unauthenticated endpoint without a shared store on the hot path. A client is
    its IP address (as ``Services.context`` computes it, trusted proxies honoured),
    an IPv6 client its /64.

    Refusals are audited once per client per ``audit_interval`` seconds, the event
    carrying how many refusals were not audited since the previous one: a flood of
    refused requests must not become a flood of audit rows (which would turn the
    rate limit into a way to fill the database)."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = MAX_TRACKED_CLIENTS,
        audit_interval: float = REFUSAL_AUDIT_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ConfigurationError("the TSA rate limit must be at least 1 per minute")
        self.capacity = float(per_minute)  # a burst of up to one minute's worth
        self.per_second = per_minute / 60.0
        self._max_clients = max_clients
        self._audit_interval = audit_interval
        self._monotonic = monotonic
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    # A client is a source (signery.server.identity.context.source_of): an IPv6 client is its /64.
    client_key = staticmethod(source_of)

    def take(self, client_ip: str | None) -> RateRefusal | None:
        """Spend one token: None when admitted, else the refusal."""
        key = self.client_key(client_ip)
        now = self._monotonic()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(self.capacity, now)
            bucket.tokens = min(
                self.capacity, bucket.tokens + (now - bucket.last) * self.per_second
            )
            bucket.last = now
            self._buckets[key] = bucket  # most recently seen last
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            retry_after = (1.0 - bucket.tokens) / self.per_second
            if bucket.audited_at is None or now - bucket.audited_at >= self._audit_interval:
                unaudited, bucket.unaudited, bucket.audited_at = bucket.unaudited, 0, now
                return RateRefusal(retry_after, audit=True, unaudited=unaudited)
            bucket.unaudited += 1
            return RateRefusal(retry_after, audit=False, unaudited=bucket.unaudited)


# ------------------------------------------------------------------ the service


class TsaService:
    """Issues RFC 3161 timestamps; every answer is audited before it leaves."""

    def __init__(
        self,
        db: Database,
        keystores: KeyStoreRegistry,
        recorder: AuditRecorder,
        clock: Clock,
        config: TsaConfig,
        *,
        limiter: ClientRateLimiter | None = None,
    ) -> None:
        self._db = db
        self._keystores = keystores
        self._recorder = recorder
        self._clock = clock
        self.config = config
        self.limiter = limiter or ClientRateLimiter(config.rate_limit_per_minute)
        self._loaded: tuple[TimestampAuthority, TokenBuilder] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the authority

    def authority(self) -> TimestampAuthority:
        """The TSA, made now if this installation has none yet (blocking: DB, key store)."""
        return self._load()[0]

    async def authority_async(self) -> TimestampAuthority:
        return (await self._loaded_async())[0]

    async def _loaded_async(self) -> tuple[TimestampAuthority, TokenBuilder]:
        loaded = self._loaded
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(self._load)
        return loaded

    def _load(self) -> tuple[TimestampAuthority, TokenBuilder]:
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            tsa = self._read()
            if tsa is None:
                tsa = self._provision()
            self._loaded = (tsa, TokenBuilder(tsa))
            return self._loaded

    def _read(self) -> TimestampAuthority | None:
        with self._db.read() as s:
            rows = {
                r.role: r
                for r in s.scalars(
                    select(CaAuthorityRow).where(CaAuthorityRow.role.in_((ROOT, ISSUING, TSA)))
                )
            }
            if ROOT not in rows or ISSUING not in rows:
                raise ConfigurationError("the built-in CA is not initialized; run `signery init`")
            row = rows.get(TSA)
            if row is None:
                return None
            tsg_path = s.scalar(select(TsgRow.path).where(TsgRow.id == row.tsg_id))
        if tsg_path is None:
            raise ConfigurationError("the TSA's TSG does not exist")
        authority = authority_of(row)
        return TimestampAuthority(
            id=row.id,
            tsg_id=row.tsg_id,
            tsg_path=tsg_path,
            algorithm=authority.algorithm,
            handle=authority.handle,
            certificate=authority.certificate,
            issuing=x509.load_der_x509_certificate(rows[ISSUING].certificate_der),
            root=x509.load_der_x509_certificate(rows[ROOT].certificate_der),
        )

    def _provision(self) -> TimestampAuthority:
        """Make the TSA of an installation initialized without one (first use).

        Several workers or replicas may get here at once: each makes a key and a
        certificate, and the unique ``role`` lets exactly one row in. The others
        destroy their key and use the winner's."""
        with self._db.read() as s:
            issuing_row = s.scalars(
                select(CaAuthorityRow).where(CaAuthorityRow.role == ISSUING)
            ).one()
            values = meta.read_meta(s)
            root_tsg_id = values[meta.ROOT_TSG_ID]
            root_path = s.scalar(select(TsgRow.path).where(TsgRow.id == root_tsg_id))
        provisioned = provision_tsa(
            self._keystores,
            self._clock,
            self.config,
            issuing=authority_of(issuing_row),
            root_tsg_id=root_tsg_id,
            installation=values.get(meta.INSTALLATION_ID, "")[:8],
        )
        store = self._keystores.get(provisioned.handle.store)
        try:
            with self._db.write() as s:
                s.add(provisioned.row)
                flush_unique(s, TsaAlreadyProvisioned())
                self._recorder.record(
                    s, created_record(provisioned, root_path or "", when="first_use")
                )
        except TsaAlreadyProvisioned:
            if isinstance(store, Destroyable):
                store.destroy(provisioned.handle)  # the race was lost: no orphaned key
        except BaseException:
            if isinstance(store, Destroyable):
                store.destroy(provisioned.handle)
            raise
        tsa = self._read()
        if tsa is None:  # pragma: no cover - a row was committed, by us or a rival
            raise ConfigurationError("the TSA row vanished after it was written")
        return tsa

    async def chain_pem(self) -> str:
        return (await self.authority_async()).chain_pem

    # ------------------------------------------------------------ requests

    async def admit(self, ctx: RequestContext, actor: Actor = ANONYMOUS) -> None:
        """The per-client rate limit, checked before the body is even read.

        A refused client gets a 429 problem document, not a TimeStampResp: nothing
        of its query was parsed. The first refusal of a client in an audit interval
        is audited (with the count of those since not audited); none is counted as
        issued."""
        refusal = self.limiter.take(ctx.client_ip)
        if refusal is None:
            return
        error = RateLimited(
            f"at most {self.config.rate_limit_per_minute} timestamps per minute per client",
            retry_after=max(1, math.ceil(refusal.retry_after)),
        )
        if refusal.audit:
            await self._refused(
                await self.authority_async(),
                error,
                ctx,
                actor=actor,
                extra={"unaudited_refusals": refusal.unaudited},
            )
        else:
            error.audited = True  # accounted for in the client's next audited refusal
        raise error

    async def timestamp(
        self,
        content_type: str | None,
        body: bytes,
        ctx: RequestContext,
        actor: Actor = ANONYMOUS,
    ) -> bytes:
        """A DER TimeStampResp for ``body``: a granted token, or a rejection with the
        failInfo of RFC 3161 §2.4.2. Raises (a problem document) when the body is
        not a timestamp query at all, or nothing can be issued (5xx, fail closed)."""
        tsa, builder = await self._loaded_async()
        try:
            if (content_type or "").split(";")[0].strip().lower() != QUERY_MEDIA_TYPE:
                raise UnsupportedMediaType(
                    f"send the query as {QUERY_MEDIA_TYPE} (RFC 3161 section 3.4)"
                )
            query = parse_query(body, policy=self.config.policy)
        except TimestampQueryRejected as e:
            await self._refused(tsa, e, ctx, actor=actor)
            return rejection_reply(e)
        except SigneryError as e:
            await self._refused(tsa, e, ctx, actor=actor)
            raise
        # RFC 3161 §2.4.2: genTime in UTC with whole seconds; the accuracy covers the
        # truncation (and the server clock's error, which the operator bounds by NTP).
        gen_time = self._clock.now().replace(microsecond=0)
        serial = random_serial()
        try:
            if gen_time >= tsa.certificate.not_valid_after_utc:
                raise TsaUnavailable("the TSA certificate has expired")
            token = await self._build(tsa, builder, query, serial, gen_time)
        except SigneryError as e:
            await self._refused(tsa, e, ctx, query, actor=actor)
            raise
        # Fail closed: the token leaves only after its event and count are durably
        # committed; AuditUnavailable propagates and nothing is returned.
        await self._recorder.commit(
            AuditRecord(
                EventKind.TIMESTAMP_ISSUED,
                AuditOutcome.SUCCEEDED,
                actor,
                tsg_id=tsa.tsg_id,
                tsg_path=tsa.tsg_path,
                key_id=tsa.id,
                key_version=1,
                algorithm=tsa.algorithm.value,
                digest=query.imprint.hex,
                context=ctx,
                details={
                    "hash_algorithm": query.imprint.algorithm.value,
                    # Serials are random_serial()'s 16 random bytes (126 bits of
                    # entropy): unique across workers and replicas with no shared
                    # counter and no database round trip (RFC 3161 §2.4.2 asks for
                    # uniqueness per TSA, not order; a collision needs ~2^63 tokens).
                    "serial": f"{serial:x}",
                    "gen_time": gen_time.isoformat(),
                    "policy": self.config.policy,
                    "nonce": query.nonce is not None,
                    "cert_req": query.cert_req,
                },
            ),
            # The TSA is counted under its key id (scope "key"); the usage report
            # shows it as subject type "tsa".
            UsageDelta(Counted.SUCCEEDED, key_id=tsa.id),
        )
        return granted_reply(token)

    async def _build(
        self,
        tsa: TimestampAuthority,
        builder: TokenBuilder,
        query: TimestampQuery,
        serial: int,
        gen_time: datetime,
    ) -> bytes:
        store = self._keystores.get(tsa.handle.store)

        def build() -> bytes:
            return builder.build(
                query,
                serial=serial,
                gen_time=gen_time,
                policy=self.config.policy,
                accuracy_seconds=self.config.accuracy_seconds,
                sign=lambda hashed: store.sign(tsa.handle, hashed, builder.scheme),
            )

        if store.signs_inline(tsa.algorithm):
            return build()
        return await anyio.to_thread.run_sync(build)

    async def _refused(
        self,
        tsa: TimestampAuthority,
        error: SigneryError,
        ctx: RequestContext,
        query: TimestampQuery | None = None,
        *,
        actor: Actor = ANONYMOUS,
        extra: dict[str, Any] | None = None,
    ) -> None:
        details: dict[str, Any] = dict(extra or {})
        if isinstance(error, TimestampQueryRejected):
            details["fail_info"] = error.failure.value
        if query is not None:
            details["hash_algorithm"] = query.imprint.algorithm.value
        outcome = AuditOutcome.DENIED if isinstance(error, RateLimited) else outcome_of(error)
        await self._recorder.commit(
            AuditRecord(
                EventKind.TIMESTAMP_REFUSED,
                outcome,
                actor,
                reason=error.code,
                tsg_id=tsa.tsg_id,
                tsg_path=tsa.tsg_path,
                key_id=tsa.id,
                key_version=1,
                algorithm=tsa.algorithm.value,
                digest=query.imprint.hex if query is not None else None,
                context=ctx,
                details=details,
            ),
            UsageDelta(Counted.of(outcome), key_id=tsa.id),
        )
        error.audited = True
