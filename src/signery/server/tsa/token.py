"""TimeStampTokens and TimeStampResps (RFC 3161 §2.4.2), as DER built with asn1crypto.

A granted token is CMS ``SignedData`` (RFC 5652) v3 over ``id-ct-TSTInfo``, whose
signed attributes carry contentType, messageDigest, signingTime, ESS
signingCertificateV2 (RFC 5816, required by ``openssl ts -verify``) and CMS
algorithm protection (RFC 6211). The signature is PKCS#1 v1.5 or ECDSA, never
PSS: ``openssl ts -verify`` and rfc3161-client refuse PSS tokens. The DER is
built with asn1crypto, never by hand. A refused query gets a TimeStampResp whose
``PKIStatusInfo`` is a rejection with its ``failInfo``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization

from signery.crypto import (
    Hashed,
    default_digest,
    default_scheme,
    hash_bytes,
    verify_signature,
)
from signery.errors import (
    SignatureVerificationFailed,
    TimestampQueryRejected,
)
from signery.protocol import DigestAlgorithm, SignatureScheme
from signery.rfc3161 import TimeStampResp
from signery.server.ca.service import rsa_or_ec
from signery.server.tsa.authority import TimestampAuthority
from signery.server.tsa.query import TimestampQuery

# asn1crypto's names for the ECDSA signature algorithms (RFC 5758 §3.2: no parameters).
_ECDSA_ALGORITHMS = {
    DigestAlgorithm.SHA256: "sha256_ecdsa",
    DigestAlgorithm.SHA384: "sha384_ecdsa",
    DigestAlgorithm.SHA512: "sha512_ecdsa",
}
# UTCTime covers 1950-2049; RFC 5652 §11.3 wants GeneralizedTime outside it.
_UTC_TIME_END = 2050


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
        self._public_key = rsa_or_ec(tsa.certificate.public_key())
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
